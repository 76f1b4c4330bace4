"""The README's reading path, measured: the lines a learner reads to follow LongLoRA through the code.

    python scripts/reading_path.py            # every step of README.md's "Read the code", and the total

The path is the list of `module.name` entries in README.md's "Read the code" section (a function, a
class, or a class's method). Each entry counts its own lines, then every function or class of the same
module that it names, and so on: the helpers one has to read to follow it. A line is counted once,
however many entries reach it. Other modules' functions are not followed: what they do is the next
entry's business, or not the method.
Nor are the helpers in SKIPPED, whose names say what they do and which are not the method; the total
with them is printed too.
"""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED = {  # name -> why a learner passes over it
    "_check": "input checks",
    "check_config": "input checks",
    "check_finite": "input checks",
    "_torch_varlen": "torch releases' kernel signatures",
    "flash_repeats_kv": "torch releases' kernel signatures",
    "Progress": "the run's log and stop decision",
    "run_settings": "command-line plumbing",
    "_KERNELS": "the kernels' table: the path names the kernel it reads",
    "positions": "packed documents, beside the method",
    "_sdpa_segments": "packed documents, beside the method",
}


def entries(readme):
    """[(step number, "module.name" or "module.Class.method")] of README.md's "Read the code" list."""
    section = readme.split("## Read the code", 1)[1].split("\n## ", 1)[0]
    steps = re.findall(r"^(\d+)\. (.*(?:\n   .*)*)", section, flags=re.M)
    return [(int(n), name) for n, text in steps for name in re.findall(r"`([a-z0-9_]+\.[A-Za-z0-9_.]+)`", text)]


def definitions(module):
    """{name: node} of a module's top-level functions and classes, and "Class.method" of their methods."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    defs = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = node
        if isinstance(node, ast.ClassDef):
            defs.update({f"{node.name}.{m.name}": m for m in node.body if isinstance(m, ast.FunctionDef)})
        if isinstance(node, ast.Assign):  # a table (lora.EXTRA, s2attn._KERNELS): read with what names it
            defs.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
    return defs


def span(node):
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return set(range(first, node.end_lineno + 1))


def measure(readme_text, skipped=SKIPPED):
    """[(step, entry, new lines)] in the README's order: each entry's lines and its helpers' not counted before."""
    seen, rows = {}, []
    for step, entry in entries(readme_text):
        module, name = entry.split(".", 1)
        defs = definitions(module)
        if name not in defs:
            raise SystemExit(f"README.md's reading path names {entry}, which {module}.py does not define")
        lines, todo, done = set(), [name], set()
        while todo:
            n = todo.pop()
            if n in done or n in skipped:
                continue
            done.add(n)
            lines |= span(defs[n])
            todo += [x.id for x in ast.walk(defs[n]) if isinstance(x, ast.Name) and x.id in defs]
        new = lines - seen.setdefault(module, set())
        seen[module] |= new
        rows.append((step, entry, len(new)))
    return rows


def main():
    readme = (ROOT / "README.md").read_text()
    rows = measure(readme)
    for step, entry, n in rows:
        print(f"{step}. {entry:40} {n:4d}")
    print(f"{'total':43} {sum(n for *_, n in rows):4d}")
    print(f"{'with what it skips (SKIPPED)':43} {sum(n for *_, n in measure(readme, skipped={})):4d}")


if __name__ == "__main__":
    sys.exit(main())
