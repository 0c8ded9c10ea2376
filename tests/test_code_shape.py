"""The code stays easy to carry on: every file in src/ at most 300 lines and every function at most 50, so that
each reads in one sitting and fits one screen."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 300, 50


def test_every_source_file_and_function_is_short():
    too_long = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(SRC)
        if (lines := len(text.splitlines())) > MAX_FILE_LINES:
            too_long.append(f"{where}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "split these along their concepts:\n" + "\n".join(too_long)
