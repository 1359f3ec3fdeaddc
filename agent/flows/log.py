"""The flow log: one JSON object per line, to a file (appended) or stdout ('-')."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, TextIO


class FlowLog:
    def __init__(self, target: Optional[str]) -> None:
        self._out: Optional[TextIO]
        if target is None:
            self._out = None
        elif target == "-":
            self._out = sys.stdout
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._out = open(target, "a", buffering=1)
        self.written = 0

    @property
    def enabled(self) -> bool:
        return self._out is not None

    def write(self, record: dict) -> None:
        if self._out is None:
            return
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.written += 1

    def flush(self) -> None:
        if self._out is not None:
            self._out.flush()

    def close(self) -> None:
        if self._out not in (None, sys.stdout):
            self._out.close()
