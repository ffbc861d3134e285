"""bench.py: speed figures for editloc, side by side with the standard tools when they are importable.

    python bench.py                  # the forward pass, probing, IPO on the default model
    python bench.py --only llama     # one section
    /path/to/venv-with-transformers/bin/python bench.py --only llama    # adds transformers, same run

The machine is shared and noisy: each figure is the best of `--repeat` runs, and ours and the reference are
measured alternately in the same process, so read the ratios rather than the absolute numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import time

import torch

from llama import Llama, as_dtype, pad_left, write_file_atomic


def best_of(fn, repeat: int, label: str = "", other=None) -> float | tuple[float, float]:
    """Seconds of the fastest of `repeat` calls, after two warm-up calls (the first large forwards of a process
    pay page faults for fresh memory). With `other`, the two are warmed up together and timed alternately,
    so neither pays for running first: returns (ours, other)."""
    fns = [fn] if other is None else [fn, other]
    for f in fns:
        f(), f()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for f, t_list in zip(fns, times):
            t = time.perf_counter()
            f()
            t_list.append(time.perf_counter() - t)
    best = [min(t) for t in times]
    if label:
        print(f"  {label}: " + " vs ".join(f"{b:.3f} s" for b in best), file=sys.stderr, flush=True)
    return best[0] if other is None else tuple(best)


def peak_rss_delta_mb(fn) -> float:
    """Peak resident memory added by fn() (MB): the kernel's high-water mark (VmHWM) is reset through
    /proc/self/clear_refs before the call (Linux), so earlier peaks (loading) do not mask it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - base


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_llama(model_name: str, repeat: int, with_reference: bool) -> dict:
    """Prefill (64 x 64 tokens, with logits) in bf16 and fp32, probing mode, greedy generation (16 prompts of
    about 40 tokens, 50 new tokens), peak memory; transformers alongside when importable."""
    from tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(200, 40000, (64, 64), generator=g)
    questions = [f"Q: Question number {i}: what happens to you if you eat {'watermelon ' * (i % 5)}seeds?\nA:"
                 for i in range(16)]
    prompts = [tok.encode(q) for q in questions]
    ref = None
    if with_reference:
        try:
            import transformers
        except ImportError:
            print("transformers is not importable here: reporting editloc alone", file=sys.stderr)
            with_reference = False
    out: dict = {"threads": torch.get_num_threads()}
    for dt in ("bf16", "fp32"):
        model = Llama.from_pretrained(model_name, dtype=dt)
        # the first generation prepacks the weights (llama.linear; a plain fp32 forward packs none)
        before = _status_mb("VmRSS")
        model.generate_ids([[200]], 1)
        prepacked_mb = _status_mb("VmRSS") - before
        if with_reference:
            ref = transformers.AutoModelForCausalLM.from_pretrained(model.source, dtype=as_dtype(dt),
                                                                    attn_implementation="sdpa").eval()
        pids, pmask = pad_left(prompts, tok.pad_id)
        n_new = len(prompts) * 50
        # figure: (items per call, editloc, transformers, repeats); transformers' probing stand-in is the hidden
        # states alone (no logits), as forward hooks on every o_proj would add to it
        cases = {"prefill_tok_s": (ids.numel(), lambda: model(ids), lambda: ref(ids), repeat),
                 "probe_tok_s": (ids.numel(), lambda: model(ids, output="probe"), lambda: ref.model(ids), repeat),
                 "generate_new_tok_s": (n_new, lambda: model.generate_ids(prompts, 50, eos_id=-1),
                                        lambda: ref.generate(pids, attention_mask=pmask, max_new_tokens=50,
                                                             min_new_tokens=50, do_sample=False,
                                                             pad_token_id=tok.pad_id), repeat)}
        r = {}
        with torch.inference_mode():
            for key, (n, ours, theirs, reps) in cases.items():
                t = best_of(ours, reps, f"{dt} {key}" + (" (editloc vs transformers)" if ref else ""),
                            theirs if ref is not None else None)
                ours_s, ref_s = t if ref is not None else (t, None)
                r[key] = n / ours_s
                if ref_s is not None:
                    r["hf_" + key], r[key.replace("_tok_s", "_ratio")] = n / ref_s, ref_s / ours_s
        weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        with torch.inference_mode():
            r["weights_mb"] = weights_mb
            r["prepacked_copies_mb"] = prepacked_mb  # resident memory added by the first one-token generation
            r["prefill_peak_extra_mb"] = peak_rss_delta_mb(lambda: model(ids))
            if ref is not None:
                r["hf_prefill_peak_extra_mb"] = peak_rss_delta_mb(lambda: ref(ids))
        out[dt] = r
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", default="llama,probe,ipo", help="comma list of sections: llama, probe, ipo")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="skip transformers even when importable")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    results = {}
    for s in sections:
        if s == "llama":
            results[s] = bench_llama(args.model, args.repeat, not args.no_reference)
        elif s == "probe":
            import probe

            results[s] = probe.bench_probe(args.model)
        elif s == "ipo":
            import ipo

            results[s] = ipo.bench_ipo(args.model)
        else:
            ap.error(f"--only: unknown section {s!r} (expected llama, probe, ipo)")
        print(f"## {s}\n{json.dumps(results[s], indent=2, default=lambda v: round(v, 3))}", flush=True)
    if args.json:
        write_file_atomic(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))


if __name__ == "__main__":
    main()
