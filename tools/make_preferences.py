"""Write data/preferences.jsonl: the project's own small preference set (MIT, like the code).

    python tools/make_preferences.py            (writes data/preferences.jsonl)

One pair per record of data/instructions.jsonl (the project's own instruction set): the same
prompt and answer twice, once opened politely (chosen) and once curtly (rejected). The two
differ only in their tone, so what DPO learns from them is plain to see: a model tuned on
the instructions answers without an opening, and after DPO opens its answers the polite way.
Seeded, so the file is the same on every run.
"""

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from engine.fileio import atomic_write  # noqa: E402
from engine.records import read_records  # noqa: E402

POLITE = ("Happy to help! ", "Sure! ", "Of course! ")
CURT = ("Ugh, fine. ", "Obviously, ", "Whatever. ", "Do it yourself next time. ")


def make(seed=2025):
    """[{"instruction", "input" (when the record has one), "chosen", "rejected"}, ...]."""
    rng = random.Random(seed)
    pairs = []
    for record in read_records(ROOT / "data" / "instructions.jsonl"):
        answer = record["output"]
        curt = rng.choice(CURT)
        pair = {k: record[k] for k in ("instruction", "input") if k in record}
        pair["chosen"] = rng.choice(POLITE) + answer
        pair["rejected"] = curt + (answer[0].lower() + answer[1:] if curt.endswith(", ")
                                   else answer)
        pairs.append(pair)
    return pairs


def main(argv=None):
    out = Path(argv[0] if argv else ROOT / "data" / "preferences.jsonl")
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in make())
    atomic_write(out, lambda f: f.write(text.encode("utf-8")))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
