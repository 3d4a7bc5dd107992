"""`bbsmall compile` / `train.py --compile-only`: the real programs compiled for TPU topologies on the CPU."""

import json
import re

import pytest

pytest.importorskip("libtpu", reason="compiling for TPU needs libtpu (the test extra installs jax[tpu])")

from bbsmall_jax.aot import programs, topology  # noqa: E402
from bbsmall_jax.aot.report import compile_and_report  # noqa: E402
from bbsmall_jax.cli import main as cli_main  # noqa: E402
from bbsmall_jax.cli import train as train_cli  # noqa: E402
from bbsmall_jax.train.config import load_config  # noqa: E402

# Big enough that FSDP shards most of the state (leaves of 4096 elements or more), small enough to compile fast.
TINY_TRAINING = {"model.vocab_size": 512, "model.d_model": 64, "model.encoder_layers": 2, "model.decoder_layers": 2,
                 "model.encoder_attention_heads": 4, "model.decoder_attention_heads": 4,
                 "model.encoder_ffn_dim": 128, "model.decoder_ffn_dim": 128, "model.max_position_embeddings": 64,
                 "max_source_length": 32, "max_target_length": 16, "buckets": [[32, 16]], "batch_size": 16,
                 "init": None}


@pytest.fixture(scope="module")
def v5e_2x2():
    return topology.load("v5e:2x2")


def _train_report(v5e_2x2, fsdp: bool):
    cfg = load_config("configs/tiny.yaml", dict(TINY_TRAINING, fsdp=fsdp))
    return compile_and_report(programs.lower_train(cfg, v5e_2x2))


@pytest.fixture(scope="module")
def train_reports(v5e_2x2):
    return {fsdp: _train_report(v5e_2x2, fsdp) for fsdp in (False, True)}


def _no_host_transfer_in_loops(report):
    assert not [t for t in report.hlo.host_transfers if t.loop is not None]


def test_topology_names():
    assert topology.canonical_name("v5e:2x2") == ("v5e:2x2", "v5e", None)
    assert topology.canonical_name("v5e-16") == ("v5e:4x4", "v5e", 16)
    assert topology.canonical_name("v4-32") == ("v4:2x2x4", "v4", 16)  # v4 slices count TensorCores
    assert topology.canonical_name("v5p-8") == ("v5p:2x2x1", "v5p", 4)
    assert topology.canonical_name("v6e-8") == ("v6e:2x4", "v6e", 8)
    single = topology.load("v5e-1")  # libtpu has no 1-chip slice: its first chip
    assert single.name == "v5e:2x2" and len(single.first(None)) == 1


def test_bad_topologies_and_a_missing_libtpu_are_clear(monkeypatch):
    with pytest.raises(topology.TopologyError, match="v5e:2x2"):
        topology.canonical_name("tpu please")
    with pytest.raises(topology.TopologyError, match="libtpu does not know topology 'v5e:3x3'"):
        topology.load("v5e:3x3")
    with pytest.raises(topology.TopologyError, match="unknown TPU generation 'v9'"):
        topology.load("v9-8")
    with pytest.raises(topology.TopologyError, match=r"--devices must be in \[1, 4\]"):
        topology.load("v5e:2x2").first(5)
    monkeypatch.setattr(topology, "libtpu_installed", lambda: False)
    with pytest.raises(topology.TopologyError, match=r"needs libtpu, which is not installed: pip install \"jax\[tpu\]\""):
        topology.load("v5e:2x2")


def test_train_step_compiles_data_parallel_and_fsdp(train_reports):
    dp, fsdp = train_reports[False], train_reports[True]
    for report in (dp, fsdp):
        assert report.devices == 4 and report.memory["fits"] and report.step_bytes > 0
        assert report.model_flops > 0 and 0 < report.mfu_bound <= 1
        assert not report.hlo.custom_calls  # only TPU-internal ones
        _no_host_transfer_in_loops(report)
    assert "data-parallel" in dp.description and "FSDP" in fsdp.description
    assert set(dp.hlo.collectives) & {"all-reduce", "reduce-scatter"}  # the gradients are summed over chips
    assert "reduce-scatter" in fsdp.hlo.collectives or "all-reduce" in fsdp.hlo.collectives
    assert "all-gather" in fsdp.hlo.collectives  # params gathered for use
    # Params and AdamW moments sharded over 4 chips: each holds about a quarter (small leaves stay whole).
    ratio = dp.memory["arguments"] / fsdp.memory["arguments"]
    print(f"argument bytes per chip, data-parallel / FSDP: {ratio:.2f}")
    assert 2.5 < ratio <= 4.0
    assert fsdp.step_bytes < dp.step_bytes


def test_packed_train_step_compiles_with_its_segment_inputs(v5e_2x2):
    """`packing: true` compiles the packed step train.py runs: the batch carries segment ids and positions."""
    cfg = load_config("configs/tiny.yaml", dict(TINY_TRAINING, fsdp=True, packing=True))
    lowered = programs.lower_train(cfg, v5e_2x2)
    batch = lowered.lowered.in_tree.children()[0].children()[1]  # (state, batch) positional arguments
    assert "decoder_segment_ids" in str(batch) and "encoder_positions" in str(batch)
    report = compile_and_report(lowered)
    assert report.devices == 4 and report.memory["fits"] and report.step_bytes > 0
    assert not report.hlo.custom_calls
    _no_host_transfer_in_loops(report)


def test_train_py_compile_only_on_two_hosts(tmp_path, capsys):
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY_TRAINING.items()]  # YAML reads JSON values
    code = train_cli.main(["--config", "configs/tiny.yaml", "--compile-only", "--topology", "v5e:2x4", "--json",
                           "--dump", str(tmp_path), *overrides])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hosts"] == 2 and report["devices"] == 8 and report["program"] == "train"
    assert "FSDP" in report["description"]  # the TPU default with several chips
    assert report["estimates"] == "compiler estimates, not measurements"
    hlo = (tmp_path / "train.hlo.txt").read_text()
    assert hlo.startswith("HloModule")
    # Dropout's bits: each device draws those of its own 2 rows (16 over 8 devices), not the whole batch's.
    rows = re.findall(r"= u32\[(\d+),[\d,]*\]\{[^}]*\} rng-bit-generator", hlo)
    assert rows and set(rows) == {"2"}


@pytest.mark.parametrize("flags", [["--num-beams", "1"], ["--num-beams", "4"], ["--sample", "--top-k", "5"]],
                         ids=["greedy", "beam", "sample"])
def test_generation_programs_compile_for_one_chip(model_dir, flags, capsys):
    code = cli_main.main(["compile", "generate", "--topology", "v5e:2x2", "--devices", "1", "--model", model_dir,
                          "--batch-size", "4", "--source-length", "12", "--max-new-tokens", "6", "--json", *flags])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["devices"] == 1 and report["step"] == "decoding step" and report["memory"]["fits"]
    assert "path=portable" in report["plan"]
    assert report["hlo"]["custom_calls"] == {}  # nothing but the TPU compiler's own custom calls
    assert not [t for t in report["hlo"]["host_transfers"] if t["loop"] is not None]


def test_compile_errors_name_what_to_fix(capsys):
    assert cli_main.main(["compile", "generate", "--topology", "v5e:3x3"]) == 2
    assert "libtpu does not know topology 'v5e:3x3'" in capsys.readouterr().err
    assert cli_main.main(["compile", "train", "--topology", "v5e:2x2"]) == 2
    assert "compile train needs --config" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # flags it does not know are not taken for overrides
        cli_main.main(["compile", "train", "--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "--nope"])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err
    assert cli_main.main(["compile", "train", "--config", "configs/tiny.yaml", "--topology", "v5e:2x2",
                          "batch_size=6"]) == 2  # an override after the flags reaches the config
    assert "must be divisible by the 4 devices" in capsys.readouterr().err
    assert train_cli.main(["--config", "configs/tiny.yaml", "--compile-only", "--topology", "v5e:2x2",
                           "batch_size=6"]) == 2
    assert "must be divisible by the 4 devices" in capsys.readouterr().err
