"""Draw the package map, docs/images/architecture.svg, from the real modules' imports.

    python scripts/architecture.py            # rewrite docs/images/architecture.svg
    python scripts/architecture.py --check    # exit 1 if the checked-in picture is stale

Each .py file under shared/, flowalign/ and llmalign/ (the embedded toy models' directories left out) is parsed with
`ast`, never imported; its `import` and `from ... import` statements (relative ones resolved) say which of the three
packages it uses. The picture has one column per package, every module listed, configs/ on top, and an arrow from
each front end to shared/ labelled with how many of its modules import shared/. Any import from shared/ into a front
end, or from one front end into the other, is drawn as a red arrow and named in red under the columns: the core must
import neither front end (tests/test_architecture.py checks both this and that the SVG is current).
Pure Python: the SVG is written by hand, no graphviz.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "images" / "architecture.svg"
PACKAGES = ("flowalign", "shared", "llmalign")  # left to right in the picture
FRONT_ENDS = ("flowalign", "llmalign")
SKIP_DIRS = {"embedded", "__pycache__"}


@dataclass
class Module:
    name: str  # dotted, e.g. "flowalign.rewards.models"
    package: str  # "shared", "flowalign" or "llmalign"
    imports: set[str] = field(default_factory=set)  # dotted names of the project modules/packages it imports


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Absolute dotted names of everything the module imports (relative imports resolved against `name`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names if alias.name != "*")
    return {n for n in found if n.split(".")[0] in PACKAGES}


def collect(root: Path = ROOT) -> dict[str, list[Module]]:
    """package -> its modules, sorted by name, each with the project imports it makes."""
    modules: dict[str, list[Module]] = {p: [] for p in PACKAGES}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if SKIP_DIRS & set(path.relative_to(root).parts):
                continue
            name = module_name(path, root)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            imports = imported_names(tree, name, path.name == "__init__.py")
            modules[package].append(Module(name, package, imports))
    for package in PACKAGES:
        modules[package].sort(key=lambda m: m.name)
    return modules


def uses(module: Module, package: str) -> bool:
    return any(n.split(".")[0] == package for n in module.imports)


def forbidden_imports(modules: dict[str, list[Module]]) -> list[tuple[str, str]]:
    """(importing module, imported package) for every import shared -> front end or front end -> other front end."""
    bad = []
    for m in modules["shared"]:
        bad += [(m.name, p) for p in FRONT_ENDS if uses(m, p)]
    for a, b in (FRONT_ENDS, FRONT_ENDS[::-1]):
        bad += [(m.name, b) for m in modules[a] if uses(m, b)]
    return bad


def config_counts(root: Path = ROOT) -> list[tuple[str, int]]:
    return [(d.name, len(list(d.glob("*.yaml")))) for d in sorted((root / "configs").iterdir()) if d.is_dir()]


# ---- drawing -------------------------------------------------------------------------------------------------------
FONT = 13  # px, monospace: a character is about 0.6 * FONT wide
LINE = 18
CHAR = 0.6 * FONT
PAD = 12
GAP = 150  # between columns, room for the arrows and their labels
TOP = 110  # y of the column boxes' top edge (configs/ above)
TITLE = {
    "flowalign": "flowalign/  (front end: images)",
    "shared": "shared/  (core: pure tensor math)",
    "llmalign": "llmalign/  (front end: text)",
}
COLOUR = {"flowalign": "#e8f0fe", "shared": "#e6f4ea", "llmalign": "#fef7e0"}
RED = "#c5221f"


def text(x: float, y: float, s: str, *, size: int = FONT, weight="normal", fill="#202124", anchor="start") -> str:
    return (
        f'<text x="{x:.0f}" y="{y:.0f}" font-size="{size}" font-weight="{weight}" fill="{fill}" '
        f'text-anchor="{anchor}">{escape(s)}</text>'
    )


def arrow(x1: float, y1: float, x2: float, y2: float, colour: str = "#5f6368", marker: str = "arrow") -> str:
    return (
        f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" stroke="{colour}" stroke-width="2" '
        f'marker-end="url(#{marker})"/>'
    )


def render(root: Path = ROOT) -> str:
    modules = collect(root)
    bad = forbidden_imports(modules)
    bad_modules = {name for name, _ in bad}
    # one column per package: as wide as its longest line
    widths, xs, x = {}, {}, 20.0
    for package in PACKAGES:
        lines = [TITLE[package]] + [m.name.split(".", 1)[-1] if "." in m.name else "__init__" for m in modules[package]]
        widths[package] = max(len(s) for s in lines) * CHAR + 2 * PAD + 16
        xs[package] = x
        x += widths[package] + GAP
    width = x - GAP + 20
    height_of = {p: (len(modules[p]) + 1) * LINE + 2 * PAD + 6 for p in PACKAGES}
    box_bottom = TOP + max(height_of.values())
    notes = [
        "Arrows: which package imports which (parsed from the source with ast by scripts/architecture.py).",
        "A dot marks a front-end module that imports shared/. shared/ must import neither front end.",
    ]
    if bad:
        notes += [f"FORBIDDEN: {name} imports {package}" for name, package in bad]
    else:
        notes.append(
            "No forbidden imports: shared/ imports neither front end, and neither front end imports the other."
        )
    height = box_bottom + 30 + LINE * len(notes) + 10

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace">',
        "<defs>",
        '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#5f6368"/></marker>',
        f'<marker id="red" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" orient="auto">'
        f'<path d="M0,0 L10,5 L0,10 z" fill="{RED}"/></marker>',
        "</defs>",
        f'<rect x="0" y="0" width="{width:.0f}" height="{height:.0f}" fill="white"/>',
    ]
    # configs/ on top, arrows down to the front ends that read them
    counts = ", ".join(f"{name}/ ({n} YAML)" for name, n in config_counts(root))
    out.append(f'<rect x="20" y="15" width="{width - 40:.0f}" height="44" rx="6" fill="#f1f3f4" stroke="#5f6368"/>')
    heading = "configs/: YAML recipes (each with a top-level recipe: key) and accelerate configs"
    out.append(text(width / 2, 35, heading, anchor="middle", weight="bold"))
    out.append(text(width / 2, 52, counts, anchor="middle"))
    for package in FRONT_ENDS:
        cx = xs[package] + widths[package] / 2
        out.append(arrow(cx, 59, cx, TOP - 2))
    # the three columns
    for package in PACKAGES:
        x0, h = xs[package], height_of[package]
        out.append(
            f'<rect x="{x0:.0f}" y="{TOP}" width="{widths[package]:.0f}" height="{h:.0f}" rx="6" '
            f'fill="{COLOUR[package]}" stroke="#5f6368"/>'
        )
        out.append(text(x0 + PAD, TOP + PAD + 12, TITLE[package], weight="bold"))
        for i, m in enumerate(modules[package]):
            y = TOP + PAD + 12 + (i + 1) * LINE
            label = m.name.split(".", 1)[1] if "." in m.name else "__init__"
            fill = RED if m.name in bad_modules else "#202124"
            out.append(text(x0 + PAD + 16, y, label, fill=fill))
            if package in FRONT_ENDS and uses(m, "shared"):
                out.append(f'<circle cx="{x0 + PAD + 5:.0f}" cy="{y - 4:.0f}" r="3.5" fill="#1e8e3e"/>')
    # arrows front end -> shared, labelled with how many modules import it
    mid = TOP + 40
    for package, (x1, x2) in {
        "flowalign": (xs["flowalign"] + widths["flowalign"], xs["shared"]),
        "llmalign": (xs["llmalign"], xs["shared"] + widths["shared"]),
    }.items():
        n = sum(uses(m, "shared") for m in modules[package])
        out.append(arrow(x1 + 4, mid, x2 - 4, mid))
        out.append(text((x1 + x2) / 2, mid - 8, "imports", anchor="middle", size=12))
        out.append(text((x1 + x2) / 2, mid + 18, f"{n} of {len(modules[package])}", anchor="middle", size=12))
        out.append(text((x1 + x2) / 2, mid + 33, "modules", anchor="middle", size=12))
    # forbidden imports, in red, lower down so they never sit on the allowed arrows
    for k, (name, package) in enumerate(bad):
        source = name.split(".")[0]
        y = TOP + 110 + 20 * k
        if xs[source] < xs[package]:
            x1, x2 = xs[source] + widths[source] + 4, xs[package] - 4
        else:
            x1, x2 = xs[source] - 4, xs[package] + widths[package] + 4
        out.append(arrow(x1, y, x2, y, colour=RED, marker="red"))
    for k, note in enumerate(notes):
        fill = RED if note.startswith("FORBIDDEN") else "#3c4043"
        out.append(text(20, box_bottom + 30 + k * LINE, note, size=12, fill=fill))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/images/architecture.svg is stale")
    args = parser.parse_args(argv)
    svg = render()
    bad = forbidden_imports(collect())
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != svg:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run python scripts/architecture.py", file=sys.stderr)
            return 1
    else:
        OUTPUT.write_text(svg, encoding="utf-8")
        print(f"wrote {OUTPUT.relative_to(ROOT)}")
    for name, package in bad:
        print(f"forbidden import: {name} imports {package}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
