"""Training config and command line: YAML and overrides, clear errors, and a smoke run on chitchat."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from bbsmall_jax.cli.train import EXIT_USAGE, main
from bbsmall_jax.testing.training import read_metrics, use_compile_cache
from bbsmall_jax.train.checkpoints import CheckpointStore, check_compatible
from bbsmall_jax.train.config import ConfigError, load_config, parse_override
from bbsmall_jax.train.output_lock import OutputInUseError, output_lock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
TINY = os.path.join(ROOT, "configs", "tiny.yaml")

use_compile_cache()


def test_shipped_configs_load():
    tiny = load_config(TINY)
    assert tiny.init is None and tiny.model_config().d_model == 64 and tiny.max_steps == 50
    real = load_config(os.path.join(ROOT, "configs", "blenderbot_small_90m.yaml"))
    assert real.init == "facebook/blenderbot_small-90M" and real.dtype == tiny.dtype == "auto"


def test_overrides():
    cfg = load_config(TINY, {"learning_rate": 1, "model.dropout": 0.0, "buckets": [[64, 32]]})
    assert cfg.learning_rate == 1.0 and cfg.model["dropout"] == 0.0 and cfg.bucket_shapes == ((64, 32),)


def test_numbers_without_a_dot_are_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 1e6\nadam_eps: 1E-8\nmax_steps: 1e3\nmodel:\n  init_std: 2e-2\n")
    overrides = dict(map(parse_override, ["weight_decay=1e-2", "warmup_steps=1e1", "model.dropout=-0e0"]))
    cfg = load_config(tmp_path / "c.yaml", overrides)
    assert (cfg.learning_rate, cfg.adam_eps, cfg.max_steps, cfg.weight_decay, cfg.warmup_steps) == (1e6, 1e-8, 1000,
                                                                                                   0.01, 10)
    assert type(cfg.max_steps) is int and cfg.model == {"init_std": 0.02, "dropout": 0.0}
    assert parse_override("data=1e6.jsonl") == ("data", "1e6.jsonl")


@pytest.mark.parametrize("overrides, message", [
    (["learning_rate=.nan"], "learning_rate must be a finite non-negative number, got nan"),
    (["learning_rate=-1e-3"], "learning_rate must be a finite non-negative number, got -0.001"),
    (["max_steps=2.5e0"], "max_steps must be a positive integer, got 2.5"),
])
def test_bad_numbers_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, dict(map(parse_override, overrides)))


@pytest.mark.parametrize("overrides, message", [
    ({"learnin_rate": 1e-3}, "unknown config key 'learnin_rate'"),
    ({"model.d_modle": 8}, "unknown model config key 'model.d_modle'"),
    ({"schedule": "exp"}, "schedule: 'exp' is not one of linear, cosine, constant"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 30, "grad_accum_steps": 4}, "divisible by grad_accum_steps"),
    ({"model.d_model": 30}, "model: .*d_model \\(30\\) must be divisible"),
    ({"buckets": [[16, 8]]}, "the last bucket must be"),
])
def test_bad_config_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "extra.yaml").write_text("batch_size: 8\nwarmup: 3\n")
    with pytest.raises(ConfigError, match="extra.yaml: unknown config key 'warmup'"):
        load_config(tmp_path / "extra.yaml")


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_bad_flags_exit_with_usage(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", TINY, "--output-dir", str(tmp_path), "--max-stepz", "3"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --max-stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", TINY, "--output-dir", str(tmp_path), "--max-steps", "three"])
    assert "invalid int value: 'three'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["warmup=3"], "unknown config key 'warmup'"),
    (["learning_rate"], "override 'learning_rate' is not of the form key=value"),
    (["--max-steps", "0"], "max_steps must be a positive integer"),
    (["--data", "/nonexistent/dialogues.jsonl"], "cannot read data file /nonexistent/dialogues.jsonl"),
])
def test_cli_errors(capsys, tmp_path, extra, message):
    code, err = _run(capsys, "--config", TINY, "--output-dir", str(tmp_path), *extra)
    assert code == EXIT_USAGE and message in err


def test_bad_tokenizer_files_are_a_usage_error(capsys, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text('{"__null__": 0, "__start__": 1, "__end__": 2, "__unk__": 3, '
                                                 '"hi": 4, "yo": 4}')
    (tmp_path / "tok" / "merges.txt").write_text("#version: 0.2\nh i</w>\ny o</w>\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"context": ["hi"], "response": "yo"}) + "\n")
    code, err = _run(capsys, "--config", TINY, "--output-dir", str(tmp_path / "out"), "--data", str(tmp_path / "d.jsonl"),
                     f"tokenizer={tmp_path / 'tok'}")
    assert code == EXIT_USAGE and "vocab.json: ids given to several tokens: 4: 'hi', 'yo'; each token" in err
    assert "Traceback" not in err


def test_init_that_cannot_be_found(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _run(capsys, "--config", TINY, "--output-dir", str(tmp_path), "--init", "./no/such/model")
    assert code == EXIT_USAGE and "no such directory" in err
    code, err = _run(capsys, "--config", TINY, "--output-dir", str(tmp_path), "--init", "facebook/blenderbot_small-90M")
    assert code == EXIT_USAGE and "could not fetch 'facebook/blenderbot_small-90M'" in err


def test_output_dir_of_another_config(capsys, tmp_path):
    other = load_config(TINY, {"learning_rate": 0.01})
    store = CheckpointStore(str(tmp_path / "checkpoints"), 1)
    store.save(5, {"x": jnp.zeros(2)}, {"step": 5, "epoch": 0, "index": 5, "fingerprint": other.fingerprint(),
                                        "config": other.trajectory_dict()})
    store.close()
    code, err = _run(capsys, "--config", TINY, "--output-dir", str(tmp_path))
    assert code == EXIT_USAGE
    assert "holds checkpoints of a different training config (learning_rate: 0.01 (checkpoint) vs 0.003 (now))" in err


def test_a_second_run_in_the_same_output_dir_is_refused(capsys, tmp_path):
    with output_lock(str(tmp_path)):
        code, err = _run(capsys, "--config", TINY, "--output-dir", str(tmp_path))
    assert code == EXIT_USAGE and f"{tmp_path} is in use by another train.py run (process {os.getpid()})" in err
    assert not (tmp_path / "checkpoints").exists()


def test_a_killed_run_leaves_its_output_dir_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bbsmall_jax.train.output_lock import "
                               "output_lock\nwith output_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(OutputInUseError, match=f"process {holder.pid}"):
        with output_lock(str(tmp_path)):
            pass
    holder.kill()
    holder.wait()
    with output_lock(str(tmp_path)):
        assert (tmp_path / ".train.lock").read_text() == f"{os.getpid()}\n"


def test_dtype_auto_resumes_a_float32_run_on_the_cpu(tmp_path):
    previous = load_config(TINY, {"dtype": "float32"})
    saved = {"fingerprint": previous.fingerprint(), "config": previous.trajectory_dict()}
    check_compatible(saved, load_config(TINY), str(tmp_path))  # auto is float32 here
    with pytest.raises(ConfigError, match="dtype: 'float32' \\(checkpoint\\) vs 'bfloat16' \\(now\\)"):
        check_compatible(saved, load_config(TINY, {"dtype": "bfloat16"}), str(tmp_path))


def test_smoke_run_on_chitchat(capsys, tmp_path):
    """The tiny config trains on chitchat: validation loss falls; the export loads in transformers."""
    code = main(["--config", TINY, "--output-dir", str(tmp_path), "--max-steps", "30", "--eval-every", "10",
                 "--log-every", "5", "--no-progress", "buckets=[[64, 32]]", "eval_batches=4", "decay_steps=50"])
    assert code == 0, capsys.readouterr().err
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    print(f"chitchat smoke run: eval loss {' -> '.join(f'{e:.3f}' for e in evals)}")
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2]
    assert all(r["tokens_per_sec"] > 0 and "learning_rate" in r for r in records)

    import transformers

    model = transformers.BlenderbotSmallForConditionalGeneration.from_pretrained(tmp_path / "final")
    tokenizer = transformers.BlenderbotSmallTokenizer.from_pretrained(tmp_path / "final")
    assert model.config.vocab_size == 1000 and len(tokenizer) <= 1000
    with open(tmp_path / "train_config.yaml", encoding="utf-8") as f:
        assert "decay_steps: 50" in f.read()
    assert json.loads((tmp_path / "final" / "config.json").read_text())["d_model"] == 64


def test_bbsmall_train_names_itself_in_errors(capsys, tmp_path):
    from bbsmall_jax.cli.main import main as bbsmall_main

    code = bbsmall_main(["train", "--config", TINY, "--output-dir", str(tmp_path), "--max-steps", "0"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "usage: bbsmall train" in err and "bbsmall train: error:" in err
    assert "max_steps must be a positive integer" in err
