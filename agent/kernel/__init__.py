"""The only package that talks to bcc: load, attach, maps, ring buffers. abi.py mirrors bpf/include/abi.h."""
