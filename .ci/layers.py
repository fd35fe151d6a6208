#!/usr/bin/env python3
"""The shape of src/ that ARCHITECTURE.md promises, checked: no import cycle among the source files, no file
over 800 product lines (test modules and `tests.rs` files do not count), and the layers run one way.

An edge A -> B is any path from file A that names an item of file B: `use crate::x::Y`, `use super::Y`,
`crate::x::y()` in code, globs included. Test code (`#[cfg(test)]` modules, `tests.rs` files) is left out.
Exit status 1 with the cycles, oversized files and layer breaks listed; 0 otherwise."""

import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
MAX_PRODUCT_LINES = 800

# Lower layers may not import higher ones (ARCHITECTURE.md, "Invariants").
LAYERS = [
    {"secret", "digest", "ids", "jwt", "oauth", "headers", "error", "telemetry", "tls"},
    {"config"},
    {"route", "auth", "exchange", "forward", "server", "admin"},
    {"proxy"},
    {"sidecar"},
    {"cli", "dev"},
    {"lib"},
]


def module_of(path):
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    if rel == ["lib"]:
        return ()
    return tuple(rel)


def strip_tests(text):
    """The text without `#[cfg(test)]` items (a module or a function with its braces)."""
    out, i = [], 0
    while True:
        j = text.find("#[cfg(test)]", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        k = j + len("#[cfg(test)]")
        end_of_item = text.find(";", k)
        brace = text.find("{", k)
        if brace < 0 or (0 <= end_of_item < brace):
            i = end_of_item + 1
            continue
        depth, m = 0, brace
        while m < len(text):
            if text[m] == "{":
                depth += 1
            elif text[m] == "}":
                depth -= 1
                if depth == 0:
                    break
            m += 1
        i = m + 1


def strip_comments_and_strings(text):
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'r#+"(?:.|\n)*?"#+', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return text


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> [`a::b`, `a::c::d`, `a::c::e`]."""
    tree = tree.strip()
    brace = tree.find("{")
    if brace < 0:
        return [tree.split(" as ")[0].strip()]
    prefix, inner = tree[:brace], tree[brace + 1 : tree.rfind("}")]
    parts, depth, start = [], 0, 0
    for n, c in enumerate(inner):
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(inner[start:n])
            start = n + 1
    parts.append(inner[start:])
    return [p for part in parts if part.strip() for p in expand_use(prefix + part.strip())]


def main():
    files = {}
    for dirpath, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".rs") and name != "main.rs":
                path = os.path.join(dirpath, name)
                if name == "tests.rs":
                    continue
                files[module_of(path)] = path
    problems = []
    edges = {m: set() for m in files}
    for module, path in files.items():
        text = open(path, encoding="utf-8").read()
        product = strip_tests(text)
        lines = [l for l in product.splitlines() if l.strip()]
        if len(lines) > MAX_PRODUCT_LINES:
            problems.append(f"{os.path.relpath(path, ROOT)}: {len(lines)} product lines (> {MAX_PRODUCT_LINES})")
        code = strip_comments_and_strings(product)
        paths = []
        for tree in re.findall(r"\buse\s+([^;]+);", code):
            paths.extend(expand_use(tree))
        paths.extend(re.findall(r"\b((?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*|::\*)+)", code))
        children = [m[-1] for m in files if m[:-1] == module and len(m) == len(module) + 1]
        for child in children:
            paths.extend(re.findall(r"(?<![:\w])(" + child + r"(?:::[A-Za-z_][A-Za-z0-9_]*|::\*)+)", code))
        for p in paths:
            segments = p.split("::")
            if segments[0] == "crate":
                base, rest = (), segments[1:]
            elif segments[0] == "super":
                base = module[:-1] if path.endswith("mod.rs") is False else module[:-1]
                rest = segments[1:]
                while rest and rest[0] == "super":
                    base, rest = base[:-1], rest[1:]
            elif segments[0] == "self":
                base, rest = module, segments[1:]
            elif module + (segments[0],) in files:
                base, rest = module, segments
            else:
                continue
            target = base
            for seg in rest:
                if target + (seg,) in files:
                    target = target + (seg,)
                else:
                    break
            if target != module and target in files:
                edges[module].add(target)
    # Cycles: strongly connected components of more than one file.
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    sys.setrecursionlimit(10000)
    for v in files:
        if v not in index:
            visit(v)
    name = lambda m: "::".join(m) or "lib"
    for scc in sccs:
        problems.append("import cycle: " + " <-> ".join(sorted(name(m) for m in scc)))

    def layer(m):
        top = m[0] if m else "lib"
        for n, members in enumerate(LAYERS):
            if top in members:
                return n
        return None

    for a, targets in edges.items():
        for b in targets:
            la, lb = layer(a), layer(b)
            if la is not None and lb is not None and lb > la:
                problems.append(f"layer break: {name(a)} (layer {la}) imports {name(b)} (layer {lb})")
    for p in sorted(problems):
        print(p)
    if "-v" in sys.argv:
        for a in sorted(edges):
            print(name(a), "->", ", ".join(sorted(name(b) for b in edges[a])))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
