"""Package size and the longest functions: the numbers docs/benchmarks.md records for issue 10.

    python tools/code_stats.py [ROOT]     # ROOT: a checkout (default: this one)
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def stats(root: Path, top: int = 5) -> tuple[int, int, list[tuple[int, str]]]:
    lines, files, funcs = 0, 0, []
    for path in sorted((root / "pixelseg").rglob("*.py")):
        src = path.read_text()
        lines += len(src.splitlines())
        files += 1
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.name}"))
    return lines, files, sorted(funcs, reverse=True)[:top]


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    lines, files, funcs = stats(root)
    print(f"{root}: {lines} lines in {files} files; longest functions:")
    for n, name in funcs:
        print(f"  {n:4d}  {name}")
