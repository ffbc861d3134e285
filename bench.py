"""bench.py: speed figures for editloc, side by side with the standard tools when they are importable.

    python bench.py                  # the forward pass, probing, IPO on the default model
    python bench.py --only llama     # one section
    /path/to/venv-with-transformers/bin/python bench.py --only llama    # adds transformers, same run

The machine is shared and noisy: each figure is the best of `--repeat` runs, and ours and the reference are
measured alternately, each in its own process, so read the ratios rather than the absolute numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import time

import torch

from llama import Llama, as_dtype, pad_left, resolve_model, write_file_atomic


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
    about 20 tokens, 50 new tokens), peak memory; transformers alongside when importable.

    Each side runs in its own worker process, as a user would run it: in one process the two would share the
    allocator's freed memory, and how often each pays page faults for fresh memory would depend on the other.
    Both workers stay alive and the calls alternate (ours, theirs, ours, ...), so neither pays more for the
    machine's noise; after two warm-up calls each, each figure is the fastest of `repeat` calls."""
    import multiprocessing

    if with_reference:
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            print("transformers is not importable here: reporting editloc alone", file=sys.stderr)
            with_reference = False
    sides = ("editloc", "transformers") if with_reference else ("editloc",)
    ctx = multiprocessing.get_context("spawn")
    out: dict = {"threads": torch.get_num_threads()}
    for dt in ("bf16", "fp32"):
        workers = {}
        for side in sides:
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_llama_worker, args=(child, side, model_name, dt, torch.get_num_threads()),
                               daemon=True)
            proc.start()
            workers[side] = (conn, proc)
        info = {side: _ask(conn, None) for side, (conn, _) in workers.items()}  # each sends its set-up when ready
        r = {}
        for case, n in info["editloc"]["cases"].items():
            times = {side: [] for side in sides}
            for i in range(2 + repeat):
                for side, (conn, _) in workers.items():
                    t = _ask(conn, ("time", case))
                    if i >= 2:
                        times[side].append(t)
            best = {side: min(t) for side, t in times.items()}
            print(f"  {dt} {case}: " + " vs ".join(f"{side} {b:.3f} s" for side, b in best.items()),
                  file=sys.stderr, flush=True)
            r[case] = n / best["editloc"]
            if with_reference:
                r["hf_" + case], r[case.replace("_tok_s", "_ratio")] = n / best["transformers"], \
                    best["transformers"] / best["editloc"]
        r["weights_mb"] = info["editloc"]["weights_mb"]
        r["prepacked_copies_mb"] = info["editloc"]["prepacked_copies_mb"]
        for side, (conn, _) in workers.items():
            r[("" if side == "editloc" else "hf_") + "prefill_peak_extra_mb"] = _ask(conn, ("peak", "prefill_tok_s"))
        for conn, proc in workers.values():
            conn.send(None)
            proc.join()
        out[dt] = r
    return out


def _ask(conn, msg):
    if msg is not None:
        conn.send(msg)
    reply = conn.recv()
    if isinstance(reply, BaseException):
        raise reply
    return reply


def _llama_worker(conn, side: str, model_name: str, dt: str, threads: int) -> None:
    """One side of bench_llama in its own process: loads the model, sends its set-up, then answers
    ("time", case) with the seconds of one call and ("peak", case) with the resident memory the call adds."""
    try:
        torch.set_num_threads(threads)
        from tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(model_name)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(200, 40000, (64, 64), generator=g)
        questions = [f"Q: Question number {i}: what happens to you if you eat {'watermelon ' * (i % 5)}seeds?\nA:"
                     for i in range(16)]
        prompts = [tok.encode(q) for q in questions]
        info = {}
        # figure: items per call -> call; transformers' probing stand-in is the hidden states alone (no
        # logits), as forward hooks on every o_proj would add to it
        if side == "editloc":
            model = Llama.from_pretrained(model_name, dtype=dt)
            info["weights_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            before = _status_mb("VmRSS")
            model.generate_ids([[200]], 1)  # the first generation prepacks the weights (llama.linear)
            info["prepacked_copies_mb"] = _status_mb("VmRSS") - before
            cases = {"prefill_tok_s": lambda: model(ids), "probe_tok_s": lambda: model(ids, output="probe"),
                     "generate_new_tok_s": lambda: model.generate_ids(prompts, 50, eos_id=-1)}
        else:
            import transformers

            ref = transformers.AutoModelForCausalLM.from_pretrained(str(resolve_model(model_name)),
                                                                    dtype=as_dtype(dt), attn_implementation="sdpa")
            ref.eval()
            pids, pmask = pad_left(prompts, tok.pad_id)
            cases = {"prefill_tok_s": lambda: ref(ids), "probe_tok_s": lambda: ref.model(ids),
                     "generate_new_tok_s": lambda: ref.generate(pids, attention_mask=pmask, max_new_tokens=50,
                                                                min_new_tokens=50, do_sample=False,
                                                                pad_token_id=tok.pad_id)}
        info["cases"] = {"prefill_tok_s": ids.numel(), "probe_tok_s": ids.numel(),
                         "generate_new_tok_s": len(prompts) * 50}
        conn.send(info)
        with torch.inference_mode():
            while (msg := conn.recv()) is not None:
                what, case = msg
                if what == "time":
                    t = time.perf_counter()
                    cases[case]()
                    conn.send(time.perf_counter() - t)
                else:
                    conn.send(peak_rss_delta_mb(cases[case]))
    except BaseException as e:  # reported by the parent's _ask
        conn.send(RuntimeError(f"bench worker ({side}, {dt}): {type(e).__name__}: {e}"))


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
