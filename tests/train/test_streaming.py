"""Corpora larger than memory (`data:` a directory or glob of JSONL, gzip JSONL and Parquet shards): reading
with errors that name the file and line, exact stream positions, disjoint shares per process, streamed
training that resumes exactly (one and two processes, packed and not), and 2 million records started fast in
bounded memory."""

import gzip
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from bbsmall_jax.runtime.examples import DataError, tokenize_examples
from bbsmall_jax.testing import loopback_coordinator
from bbsmall_jax.testing.corpora import corpus_tokenizer, streaming_job, write_shards
from bbsmall_jax.testing.training import read_metrics, subprocess_env
from bbsmall_jax.train import corpus as corpus_lib
from bbsmall_jax.train.corpus import ShardedCorpus, StreamPosition, find_shards, read_examples, shard_records


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, where train.py is


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(shard directory, tokenizer directory): 5 shards of 300 records, two of each kind but Parquet."""
    root = tmp_path_factory.mktemp("corpus")
    write_shards(str(root / "shards"), 1500, 5)
    corpus_tokenizer(str(root / "tokenizer"))
    return str(root / "shards"), str(root / "tokenizer")


def _tags(turns) -> list[str]:
    """The "sK rI" tag of each context (its turns): which record it came from."""
    return [" ".join(context[-1].split()[-2:]) for context in turns]


def test_every_kind_of_shard_reads_its_records_in_order(corpus):
    shards = find_shards(corpus[0])
    assert [os.path.basename(p) for p in shards] == [f"part-0000{k}{s}" for k, s in
                                                     enumerate([".jsonl", ".jsonl.gz", ".parquet"] * 2)][:5]
    assert find_shards(os.path.join(corpus[0], "*.parquet")) == [shards[2]]
    for k, path in enumerate(shards):
        records = list(shard_records(path))
        assert [index for index, _ in records] == list(range(300))
        assert _tags([r.turns for _, r in records]) == [f"s{k} r{i}" for i in range(300)]
        assert [index for index, _ in shard_records(path, start=297)] == [297, 298, 299]
    assert len(read_examples(corpus[0])) == 1500


def test_bad_shards_are_named_with_their_line(tmp_path):
    good = '{"context": ["hi"], "response": "yo"}\n'
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(good + "\n" + '{"context": ["hi"]}\n')
    with pytest.raises(DataError, match=r"a\.jsonl\.gz:3: needs a \"response\""):
        list(shard_records(str(tmp_path / "a.jsonl.gz")))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(good.encode() * 50)[:-20])  # cut mid-stream
    with pytest.raises(DataError, match=r"cannot read data shard .*b\.jsonl\.gz"):
        list(shard_records(str(tmp_path / "b.jsonl.gz")))
    (tmp_path / "c.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"c\.parquet: not a readable Parquet file"):
        list(shard_records(str(tmp_path / "c.parquet")))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"context": ["a", None], "response": ["b", "c"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: row 2: needs \"context\""):
        list(shard_records(str(tmp_path / "d.parquet")))
    (tmp_path / "e.txt").write_text(good)
    with pytest.raises(DataError, match=r"e\.txt: not a JSONL .* shard"):
        find_shards(str(tmp_path / "*"))
    with pytest.raises(DataError, match="no such file or directory"):
        find_shards(str(tmp_path / "missing.parquet"))


def _stream(corpus, process=0, processes=1, seed=0):
    from bbsmall_jax.text.tokenizer import BlenderbotSmallTokenizer

    tokenizer = BlenderbotSmallTokenizer.from_pretrained(corpus[1])
    return ShardedCorpus(find_shards(corpus[0]), process, processes, seed,
                         lambda examples: tokenize_examples(examples, tokenizer, 32, 16))


def test_a_stream_started_at_any_position_continues_exactly(corpus, monkeypatch):
    monkeypatch.setattr(corpus_lib, "CHUNK", 64)  # positions inside chunks, across chunks, shards and epochs
    stream = _stream(corpus)
    whole = stream.examples(StreamPosition())
    seen = [next(whole) for _ in range(3200)]  # two epochs and then some
    whole.close()
    epoch_0 = [tuple(source) for _, source, _ in seen[:1500]]
    assert len(set(epoch_0)) == 1500  # each record once an epoch
    assert sorted(epoch_0) == sorted(tuple(source) for _, source, _ in seen[1500:3000])
    assert [tuple(s) for _, s, _ in seen[:64]] != sorted(tuple(s) for _, s, _ in seen[:64])  # shuffled
    for cut in (0, 1, 63, 64, 299, 1499, 1500, 2345):
        again = stream.examples(seen[cut][0])
        for position, source, target in seen[cut + 1:cut + 40]:
            got = next(again)
            assert got[0] == position
            np.testing.assert_array_equal(got[1], source)
            np.testing.assert_array_equal(got[2], target)
        again.close()


def test_processes_read_disjoint_shares(corpus):
    shares = [_stream(corpus, p, 2).shards for p in range(2)]
    assert set(shares[0]).isdisjoint(shares[1]) and sorted(shares[0] + shares[1]) == find_shards(corpus[0])
    with pytest.raises(DataError, match="5 training shards cannot give each of 6 processes its own share"):
        _stream(corpus, 0, 6)


@pytest.mark.parametrize("packing", [False, True])
def test_streamed_training_resumes_exactly(corpus, packing, tmp_path):
    from bbsmall_jax.train.loop import train

    cfg = streaming_job(*corpus, packing=packing, max_steps=8, save_every=2)
    train(cfg, str(tmp_path / "whole"))
    whole = [r["loss"] for r in read_metrics(tmp_path / "whole")]
    train(cfg.replace(max_steps=5), str(tmp_path / "cut"))  # checkpoints at steps 4 and 5
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "5")  # killed before step 5's save completed
    train(cfg, str(tmp_path / "cut"))
    resumed = [r["loss"] for r in read_metrics(tmp_path / "cut")]
    assert len(whole) == len(resumed) == 8 and np.isfinite(whole).all()
    np.testing.assert_allclose(resumed, whole, rtol=1e-6, atol=1e-7)
    states = sorted(os.listdir(tmp_path / "cut" / "stream_state"))
    assert states == ["step_6.process_0.json", "step_8.process_0.json"]  # kept with their checkpoints
    state = json.loads((tmp_path / "cut" / "stream_state" / states[-1]).read_text())
    assert state["processes"] == 1 and state["position"][0] == 0


def test_two_processes_stream_their_own_shares_and_resume_exactly(corpus, tmp_path):
    coordinator = loopback_coordinator()
    if coordinator is None:
        pytest.skip("the host name does not resolve to a loopback address; CPU collectives would leave loopback")
    flags = [sys.executable, "-m", "bbsmall_jax.testing.train_worker", "--output-dir", str(tmp_path), "--corpus",
             corpus[0], "--tokenizer", corpus[1], "--coordinator", coordinator, "--num-processes", "2"]
    env = subprocess_env(XLA_FLAGS="--xla_backend_optimization_level=0")
    workers = [subprocess.Popen(flags + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert result["processes"] == 2
    assert result["shards"] == [[0, 2], [1, 3]]  # the last shard (4) is held out for validation
    assert len(result["whole"]) == 6 and np.isfinite(result["whole"]).all()
    np.testing.assert_allclose(result["resumed"], result["whole"], rtol=1e-6, atol=1e-7)


def _peak_rss(pid: int, known: float) -> float:
    """The larger of `known` and process `pid`'s peak RSS so far in GiB (VmHWM: its own since its exec, where
    the rusage of a forked child also counts the parent's pages)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return max(known, int(line.split()[1]) / 2**20)  # kB
    except (OSError, StopIteration):  # the process has just ended
        return known


def _train_py(config: str, output, log_path) -> tuple[int, float, float]:
    """Run train.py on `config` into `output`: (exit status, seconds from launch until its first step is logged,
    its peak RSS in GiB, sampled every 20 ms)."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        run = subprocess.Popen([sys.executable, "train.py", "--config", config, "--output-dir", str(output)],
                               env=subprocess_env(), stderr=log, cwd=ROOT)
        first_step, peak, metrics = None, 0.0, output / "metrics.jsonl"
        while run.poll() is None:
            peak = _peak_rss(run.pid, peak)
            if first_step is None and metrics.exists() and metrics.stat().st_size:
                first_step = time.monotonic() - start
            time.sleep(0.02)
    return run.returncode, first_step, peak


def test_two_million_records_start_fast_in_bounded_memory(tmp_path):
    write_shards(str(tmp_path / "shards"), 2_000_000, 16)
    write_shards(str(tmp_path / "small"), 2_000, 2)
    corpus_tokenizer(str(tmp_path / "tokenizer"))
    cfg = streaming_job(str(tmp_path / "shards"), str(tmp_path / "tokenizer"), max_steps=20, decay_steps=20,
                        log_every=1, save_every=10, eval_every=10, eval_batches=2)
    cfg.save_yaml(tmp_path / "config.yaml")
    # The same programs compiled first, on a small corpus, into the persistent compile cache: what is timed
    # is starting on the big corpus, not compiling (which takes 10-20 s here on a cold cache).
    cfg.replace(data=str(tmp_path / "small"), max_steps=1).save_yaml(tmp_path / "warm.yaml")
    status, _, _ = _train_py(str(tmp_path / "warm.yaml"), tmp_path / "warm", tmp_path / "warm.log")
    assert status == 0, (tmp_path / "warm.log").read_text()[-3000:]

    status, first_step, peak = _train_py(str(tmp_path / "config.yaml"), tmp_path / "run", tmp_path / "train.log")
    assert status == 0, (tmp_path / "train.log").read_text()[-3000:]
    records = read_metrics(tmp_path / "run")
    print(f"2,000,000 records in 16 shards: first step done {first_step:.1f} s after launch (programs compiled "
          f"before), peak RSS {peak:.2f} GiB, {len(records)} steps")
    assert first_step < 30 and peak < 1.5
    assert [r["step"] for r in records] == list(range(1, 21)) and "eval_loss" in records[-1]
