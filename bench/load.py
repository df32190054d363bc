"""Reading and converting a large SFT file: the streaming converter (alignflow.data.instructions.write_converted, what
load_data runs) against reading the whole file into Python lists first (alignflow.data.instructions.load_rows, then
write_jsonl: the reader before issue 15), side by side on the same synthetic file.

    python bench/load.py [--rows 1000000] [--repeats 1] [--out docs/load.md]

Each variant runs in a fresh process (peak RSS is the process's own, from getrusage), the variants
alternate when repeated; the converted files must be identical (same digest). Writes a Markdown table
with the command, the machine and the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta reverse sort count the list of words numbers sum add say explain why how "
         "a an and or not in on to from with each every first last letter sentence answer question").split()

VARIANT = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from alignflow.data.instructions import load_rows, write_converted
from alignflow.data.records import write_jsonl
from alignflow.refs import digest_path

src, out, variant = {src!r}, Path({out!r}), {variant!r}
start = time.perf_counter()
if variant == "streaming":
    rows = write_converted(src, out)["rows"]
else:
    converted = load_rows(src)
    write_jsonl(converted, out)
    rows = len(converted)
digest = digest_path(out)
seconds = time.perf_counter() - start
# VmHWM: this process image's own peak (getrusage's ru_maxrss survives exec: a big parent's peak shows through)
status = Path("/proc/self/status")
hwm = [line for line in status.read_text().splitlines() if line.startswith("VmHWM:")] if status.exists() else []
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"rows": rows, "seconds": seconds, "peak_rss_mb": peak, "digest": digest}}))
"""


def make_file(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
            row = {"instruction": text(rng.randint(4, 16)), "output": text(rng.randint(4, 30))}
            if i % 3 == 0:
                row["input"] = text(rng.randint(2, 10))
            f.write(json.dumps(row) + "\n")


def run(variant: str, src: Path, out: Path) -> dict:
    code = VARIANT.format(root=str(ROOT), src=str(src), out=str(out), variant=variant)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "load.md"))
    args = parser.parse_args()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignflow-load-") as tmp:
        src = Path(tmp) / "sft.jsonl"
        make_file(src, args.rows)
        size_mb = src.stat().st_size / 2**20
        results: dict[str, list[dict]] = {"streaming": [], "materialised": []}
        for _ in range(args.repeats):
            for variant in results:
                out = Path(tmp) / variant / "converted.jsonl"  # one name: a file's digest covers its name
                out.parent.mkdir(exist_ok=True)
                results[variant].append(run(variant, src, out))
                print(variant, results[variant][-1], flush=True)
    digests = {r["digest"] for rs in results.values() for r in rs}
    assert len(digests) == 1, f"the variants converted differently: {digests}"

    def median(variant: str, key: str) -> float:
        values = sorted(r[key] for r in results[variant])
        return values[len(values) // 2]

    stream_s, list_s = median("streaming", "seconds"), median("materialised", "seconds")
    stream_mb, list_mb = median("streaming", "peak_rss_mb"), median("materialised", "peak_rss_mb")
    command = "python bench/load.py" + "".join(f" --{k} {v}" for k, v in (("rows", args.rows),
                                                                          ("repeats", args.repeats)))
    lines = [
        "# Reading and converting a large SFT file (bench/load.py)", "",
        f"- command: `{command}`",
        f"- machine: {platform.machine()}, Python {platform.python_version()}; file: {args.rows:,} Alpaca rows, "
        f"{size_mb:.0f} MiB of JSONL (synthetic, seeded)",
        f"- each variant in a fresh process; {args.repeats} run(s) each, alternating; medians; the converted files "
        f"are identical (digest {digests.pop()[:23]}…); wall time {(time.perf_counter() - wall) / 60:.1f} min", "",
        "| variant | seconds | rows/s | peak RSS MiB |", "|---|---|---|---|",
        f"| streaming (write_converted: load_data now) | {stream_s:.1f} | {args.rows / stream_s:,.0f} | "
        f"{stream_mb:.0f} |",
        f"| materialised (load_rows + write_jsonl: before) | {list_s:.1f} | {args.rows / list_s:,.0f} | "
        f"{list_mb:.0f} |", "",
        f"Ratios, streaming / materialised: peak RSS {stream_mb / list_mb:.3f}×, throughput "
        f"{list_s / stream_s:.2f}×.", "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
