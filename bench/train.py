"""Train-step throughput, ours against transformers' PyTorch loop, step by step on the same weights and batch.

    python bench/train.py                                   # CPU, the 90M shape, 16 x (64 + 32) tokens
    python bench/train.py --jax-threads 1                   # ours on one XLA worker thread
    python bench/train.py --backend gpu --batch 64          # CUDA: torch in bf16 autocast, ours --dtype auto
    python bench/train.py --pipeline-only                   # the input pipeline alone

Both sides train, on one device, the same random-weight model (the 90M shape by default; dropout 0.1) on
the same batch, whose rows have random source and target lengths (so padding differs from real tokens),
with AdamW (weight decay 0.01) and gradient clipping at 1.0. Torch runs transformers' BlenderbotSmallForConditional-
Generation in eager mode; on the CPU it is first timed at 1 thread and at all cores and keeps the faster.
The timed steps alternate (a pair is one step of each, the side going first alternating), the ratio is
the median of the per-pair ratios, and our compile time is reported apart. MFU is model FLOPs
(`bbsmall_jax/train/flops.py`) per second over the device's peak: a table of accelerators or
`--peak-flops`; a CPU has no entry, so there it is reported only when given. At the end the input
pipeline (tokenization and batching of chitchat, as train.py does) is timed and compared with the step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default="cpu",
                        help="JAX backend; torch runs on cuda for gpu and is skipped on tpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--source-len", type=int, default=64)
    parser.add_argument("--target-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed pairs (a step of each side)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU); torch autocasts to "
                             "bfloat16 when ours computes in it; params and optimizer state stay float32")
    parser.add_argument("--remat", default="none", choices=("none", "dots", "full"))
    parser.add_argument("--loss", choices=("fused", "plain"), default=None,
                        help="our loss path (default: the training plan's; see train/plan.py)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="CPU threads for torch (0: time a step at 1 and at all cores, keep the faster)")
    parser.add_argument("--jax-threads", type=int, default=0,
                        help="worker threads of XLA's CPU backend (0: all cores; 1 does better than 2 when another "
                             "process keeps a core busy)")
    parser.add_argument("--no-torch", action="store_true", help="time ours only")
    parser.add_argument("--peak-flops", type=float, default=0.0,
                        help="one device's peak FLOP/s for MFU (default: a table of accelerators)")
    parser.add_argument("--small", action="store_true", help="a 2-layer, 8k-vocabulary model (quick smoke run)")
    parser.add_argument("--profile", metavar="DIR", help="trace one of our steps into DIR and print where its time "
                        "goes (CPU: bench/xla_profile.py)")
    parser.add_argument("--pipeline-only", action="store_true", help="time the input pipeline alone")
    parser.add_argument("--pipeline-examples", type=int, default=20_000,
                        help="chitchat examples tokenized in the pipeline measurement (0: skip it)")
    return parser.parse_args()


ARGS = parse_args()
os.environ["JAX_PLATFORMS"] = ARGS.backend if ARGS.backend != "gpu" else "cuda"
if ARGS.loss:
    os.environ["BBSMALL_TRAIN_LOSS"] = ARGS.loss
if ARGS.profile:  # the step's optimized HLO, for the summary of the trace
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={ARGS.profile}/hlo "
                               "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step").strip()
ALL_CPUS = os.sched_getaffinity(0)
if ARGS.backend == "cpu" and 0 < ARGS.jax_threads < len(ALL_CPUS):
    # XLA sizes its CPU thread pool by the CPUs this process may run on when the backend starts.
    os.sched_setaffinity(0, set(sorted(ALL_CPUS)[:ARGS.jax_threads]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.devices()
for task in os.listdir("/proc/self/task"):  # then every thread may run on any CPU again
    try:
        os.sched_setaffinity(int(task), ALL_CPUS)
    except OSError:
        pass

from bbsmall_jax.runtime.precision import compute_dtype  # noqa: E402
from bbsmall_jax.testing.machine import describe as machine  # noqa: E402
from bbsmall_jax.testing.shapes import FULL_90M  # noqa: E402
from bbsmall_jax.train import flops as flops_lib  # noqa: E402

FULL_90M_TRAINING = dict(FULL_90M, dropout=0.1)
SMALL = dict(FULL_90M_TRAINING, vocab_size=8192, encoder_layers=2, decoder_layers=2)
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.01, 1.0


def make_batch(vocab: int, batch: int, source_len: int, target_len: int, seed: int = 0) -> dict:
    """Random ids, right-padded rows of random lengths (half to all of each side's length)."""
    rng = np.random.default_rng(seed)
    source_lengths = rng.integers(max(source_len // 2, 1), source_len + 1, batch)
    target_lengths = rng.integers(max(target_len // 2, 1), target_len + 1, batch)
    mask = np.arange(source_len)[None, :] < source_lengths[:, None]
    labels = np.where(np.arange(target_len)[None, :] < target_lengths[:, None],
                      rng.integers(4, vocab, (batch, target_len)), -100)
    return {"input_ids": np.where(mask, rng.integers(4, vocab, (batch, source_len)), 0).astype(np.int32),
            "attention_mask": mask.astype(np.int32), "labels": labels.astype(np.int32)}


class TorchSide:
    """transformers' model in train mode with torch's AdamW and clipping; one call is one step."""

    def __init__(self, hf, batch: dict, device: str, bf16: bool):
        import torch

        self.torch, self.device, self.bf16 = torch, device, bf16
        self.model = hf.to(device).train()
        self.tensors = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.losses: list[float] = []

    def __call__(self) -> float:
        torch = self.torch
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(**self.tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())  # waits for the device
        return self.losses[-1]

    def pick_threads(self) -> int:
        """On the CPU, the thread count (1 or all cores) at which a step is faster; it is kept set."""
        torch = self.torch
        best, best_time = 1, float("inf")
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            self()  # a step at this thread count before timing one
            elapsed = timed(self)[0]
            print(f"  torch, {threads} thread(s): {elapsed * 1e3:,.0f} ms/step", flush=True)
            if elapsed < best_time:
                best, best_time = threads, elapsed
        torch.set_num_threads(best)
        return best


class OurSide:
    """Our jitted train step (the training plan of the backend and dtype), state donated between calls."""

    def __init__(self, directory: str, batch: dict, dtype: str, remat: str):
        from bbsmall_jax import BlenderbotSmallForConditionalGeneration
        from bbsmall_jax.nn.layer_stacks import stack_layers
        from bbsmall_jax.nn.model import build_module
        from bbsmall_jax.train.config import TrainConfig
        from bbsmall_jax.train.plan import choose_plan
        from bbsmall_jax.train.steps import learning_rate_schedule, make_optimizer, make_train_step

        loaded = BlenderbotSmallForConditionalGeneration.from_pretrained(directory)
        cfg = TrainConfig(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
                          schedule="constant", dtype=dtype, remat=remat, model={"vocab_size": loaded.config.vocab_size})
        self.plan = choose_plan(jax.default_backend(), jnp.dtype(dtype))
        module = build_module(loaded.config, "seq2seq_lm", jnp.dtype(dtype), jnp.float32, **self.plan.module_options())
        optimizer = make_optimizer(cfg)
        # The layout train.py's state has on this backend (layers stacked where the plan scans them).
        stacked = self.plan.stacks_layers(loaded.config)
        params = jax.device_put(stack_layers(loaded.params) if stacked else loaded.params)
        self.state = {"params": params, "opt_state": jax.jit(optimizer.init)(params),
                      "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0)}
        step = jax.jit(make_train_step(module, optimizer, learning_rate_schedule(cfg), remat=remat, plan=self.plan),
                       donate_argnums=0)
        self.batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # [accum=1, B, L]
        start = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.losses: list[float] = []

    def __call__(self) -> float:
        self.state, metrics = self.compiled(self.state, self.batch)
        self.losses.append(float(metrics["loss"]))  # waits for the step
        return self.losses[-1]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def pipeline_rate(batch_size: int, source_len: int, target_len: int, examples: int) -> dict:
    """Examples/s of tokenizing chitchat (cold caches) and of batching it (plan, pad, device arrays)."""
    from bbsmall_jax.runtime.models import DEMO_MODEL_DIR
    from bbsmall_jax.text.tokenizer import BlenderbotSmallTokenizer
    from bbsmall_jax.runtime.examples import tokenize_examples
    from bbsmall_jax.train import data as data_lib
    from bbsmall_jax.train.sharding import Feeder, make_mesh

    train, _ = data_lib.load_examples("chitchat", None, 0.05, 0)
    train = train[:examples]
    tokenizer = BlenderbotSmallTokenizer.from_pretrained(DEMO_MODEL_DIR)
    tokenize_s, tokenized = timed(lambda: tokenize_examples(train, tokenizer, source_len, target_len))
    buckets = ((max(source_len // 4, 1), max(target_len // 4, 1)), (max(source_len // 2, 1), max(target_len // 2, 1)),
               (source_len, target_len))
    batcher = data_lib.BucketBatcher(tokenized, batch_size, buckets, 0, tokenizer.pad_token_id)
    feeder = Feeder(make_mesh(jax.devices()[:1]), batch_size, 1)  # one device, as the timed step
    scheduled = list(zip(range(max(2000 // batch_size, 20)), batcher.schedule()))

    def batch_all():
        for _, p in scheduled:
            jax.block_until_ready(feeder.train_batch(batcher, p)[1])

    batch_s, _ = timed(batch_all)
    return {"examples": len(train), "tokenize": len(train) / tokenize_s,
            "batch": len(scheduled) * batch_size / batch_s, "vocab": len(tokenizer)}


def print_pipeline(rate: dict, step_examples_per_s: float | None) -> None:
    both = 1.0 / (1.0 / rate["tokenize"] + 1.0 / rate["batch"])
    print(f"input pipeline ({rate['examples']:,} chitchat examples, the demo model's {rate['vocab']:,}-token "
          f"vocabulary): tokenization {rate['tokenize']:,.0f} examples/s, batching {rate['batch']:,.0f} "
          f"examples/s, both {both:,.0f} examples/s", end="")
    if step_examples_per_s:
        print(f"; our step takes {step_examples_per_s:,.1f} examples/s: the pipeline is "
              f"{both / step_examples_per_s:,.0f}x faster (batching alone, what runs beside the steps in the "
              f"prefetch thread: {rate['batch'] / step_examples_per_s:,.0f}x)")
    else:
        print()


def main():
    if ARGS.pipeline_only:
        print(f"machine: {machine()}")
        print_pipeline(pipeline_rate(ARGS.batch, ARGS.source_len, ARGS.target_len, ARGS.pipeline_examples), None)
        return
    from bbsmall_jax.testing.reference_models import random_hf_model, save_hf_model, scale_reference_decoder_embeddings

    backend = jax.default_backend()
    dtype = compute_dtype(ARGS.dtype, backend)
    shape = SMALL if ARGS.small else FULL_90M_TRAINING
    hf = random_hf_model(**shape)
    batch = make_batch(shape["vocab_size"], ARGS.batch, ARGS.source_len, ARGS.target_len)
    padded = ARGS.batch * (ARGS.source_len + ARGS.target_len)
    real = int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())
    params = sum(p.numel() for p in hf.parameters()) - hf.final_logits_bias.numel()
    step_flops = flops_lib.train_flops(hf.config, ARGS.batch, ARGS.source_len, ARGS.target_len)
    print(f"model: {params / 1e6:.1f}M params; batch {ARGS.batch} x (source {ARGS.source_len} + target "
          f"{ARGS.target_len}) = {padded:,} tokens, {real:,} of them not padding; {step_flops / 1e9:,.0f} GFLOP "
          f"per step; dtype {dtype}", flush=True)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as directory:
        save_hf_model(hf, directory)
        ours = OurSide(directory, batch, dtype, ARGS.remat)
    print(f"ours: compiled in {ours.compile_s:.1f} s; plan: {ours.plan.describe()}", flush=True)
    sides = {"ours": ours}
    threads = None
    if not ARGS.no_torch and backend != "tpu":
        scale_reference_decoder_embeddings(hf)  # the checkpoint's semantics (see DESIGN.md)
        torch_side = TorchSide(hf, batch, "cuda" if backend == "gpu" else "cpu", dtype == "bfloat16")
        if backend == "cpu":
            threads = ARGS.torch_threads or torch_side.pick_threads()
            torch_side.torch.set_num_threads(threads)
        sides["torch"] = torch_side
    for side in sides.values():
        side()  # a warm step each
    times = {name: [] for name in sides}
    for i in range(ARGS.steps):
        order = list(sides) if i % 2 else list(sides)[::-1]
        for name in order:
            times[name].append(timed(sides[name])[0])
        print(f"  pair {i + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e3:,.0f} ms" for n in sides)
              + f"  (load {os.getloadavg()[0]:.2f})", flush=True)
    if ARGS.profile:
        import glob

        from xla_profile import summarize

        jax.profiler.start_trace(os.path.join(ARGS.profile, "trace"))
        ours()
        jax.profiler.stop_trace()
        hlo = sorted(glob.glob(os.path.join(ARGS.profile, "hlo", "*jit_step.cpu_after_optimizations.txt")))
        print(f"a trace of one of our steps is in {ARGS.profile}/trace")
        if hlo:
            print(summarize(os.path.join(ARGS.profile, "trace"), hlo[-1]))

    peak, peak_source = flops_lib.peak_flops(jax.devices()[0].device_kind, ARGS.peak_flops)
    print()
    print(f"machine: {machine()} (load average before: {', '.join(f'{x:.2f}' for x in load_before)})")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
          + (f" with {ARGS.jax_threads} worker thread(s)" if ARGS.jax_threads else "") + (
        f"; torch {sides['torch'].torch.__version__} on {sides['torch'].device}"
        + (f" at {threads} thread(s)" if threads else "") if "torch" in sides else ""))
    print(f"peak: {'%.0f TFLOP/s' % (peak / 1e12) if peak else 'not known'} ({peak_source})")
    print()
    print("| side | ms/step | tokens/s (padded) | tokens/s (not padding) | TFLOP/s | MFU | compile s | first loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, side_times in times.items():
        step = statistics.median(side_times)
        mfu = f"{step_flops / step / peak:.1%}" if peak else "-"
        label = "ours (JAX)" if name == "ours" else "transformers (PyTorch eager)"
        compile_s = f"{ours.compile_s:.1f}" if name == "ours" else "-"
        print(f"| {label} | {step * 1e3:,.0f} | {padded / step:,.0f} | {real / step:,.0f} | "
              f"{step_flops / step / 1e12:.3f} | {mfu} | {compile_s} | {sides[name].losses[0]:.4f} |")
    if "torch" in times:
        ratios = [t / o for t, o in zip(times["torch"], times["ours"])]
        print(f"\nspeed-up over transformers: {statistics.median(ratios):.2f}x (median of {len(ratios)} pairs: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}); first-step losses differ by dropout masks only")
    if ARGS.pipeline_examples:
        print()
        print_pipeline(pipeline_rate(ARGS.batch, ARGS.source_len, ARGS.target_len, ARGS.pipeline_examples),
                       ARGS.batch / statistics.median(times["ours"]))


if __name__ == "__main__":
    main()
