"""The node's L7 gateway (issue 10): connections that need model policy, handed over by the kernel."""
