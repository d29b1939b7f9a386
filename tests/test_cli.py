"""The command line: `info` runs anywhere and lists the kernel cache; `bench` reads model configs and
exits 2 with a message where it cannot run; `demo` is wired to pagedinfer.demo."""
import json
import os
import subprocess
import sys

import pytest

from pagedinfer import cli, kernels
from pagedinfer.cache import SPECIALIZATIONS


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pagedinfer.cli", *args], env=env, capture_output=True, text=True)


def test_info_prints_versions_and_cache(tmp_path):
    env = {"PAGEDINFER_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    out = run_cli("info", env=env).stdout
    assert "pagedinfer" in out and "torch" in out
    assert f"kernel cache  {tmp_path / 'cache'} (0 compiled kernels" in out


def test_info_lists_the_compiled_kernels(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PAGEDINFER_CACHE_DIR", str(cache))
    (source, expression), (_, other) = SPECIALIZATIONS[:2]
    kernels.cached_cubin(source, expression, "sm_80")
    kernels.cached_cubin(source, other, "sm_90a", {"PAGEDINFER_X": 1})
    shared = cache / "shared.cubin"  # writable by others: the loader ignores it, so info does not vouch for it
    shared.write_bytes(next(cache.glob("*.cubin")).read_bytes())
    shared.chmod(0o666)
    out = run_cli("info", env={**os.environ, "PAGEDINFER_CACHE_DIR": str(cache)}).stdout
    assert "(3 compiled kernels" in out
    assert f"{source} [{expression}] for sm_80\n" in out
    assert f"{source} [{other}] for sm_90a -DPAGEDINFER_X=1\n" in out
    assert "1 not listed" in out


def test_info_rejects_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "--verbose"])
    assert e.value.code == 2 and "unrecognized arguments: --verbose" in capsys.readouterr().err


def test_bench_without_a_gpu_exits_2_with_a_message():
    result = run_cli("bench", "--preset", "decode", env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert result.stderr.strip() == ("pagedinfer bench: needs an NVIDIA GPU visible to torch "
                                     "(torch.cuda.is_available() is False)")


def test_bench_help_names_presets_and_model_config(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: pagedinfer bench" in out
    assert "{all,decode,prefill,verify}" in out and "--model-config" in out and "--out" in out


LLAMA_3_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8}


@pytest.mark.parametrize("config,heads", [
    (LLAMA_3_8B, (32, 8, 128)),                                                       # head_dim from hidden_size
    ({"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}, (16, 8, 128)),
    ({"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": None}, (9, 3, 64)),
    ({"hidden_size": 2048, "num_attention_heads": 16}, (16, 16, 128)),                # no KV heads: MHA
    ({"model_type": "llava", "text_config": LLAMA_3_8B}, (32, 8, 128)),               # multimodal
])
def test_model_config_heads(config, heads):
    from pagedinfer.bench_cases import model_cases, model_heads
    assert model_heads(config) == heads
    assert model_cases("decode", heads)[0][0] == heads


@pytest.mark.parametrize("config,message", [
    ({"hidden_size": 4096}, "num_attention_heads: expected"),
    ({"num_attention_heads": 32}, "head_dim: expected head_dim or hidden_size"),
    ({"hidden_size": 4608, "num_attention_heads": 64, "num_key_value_heads": 8}, "head_dim: expected one of 64, 80"),
    ({"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 1}, "GQA group size from 1 to 16"),
])
def test_bad_model_config_exits_2_naming_the_field(tmp_path, capsys, config, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert cli.main(["bench", "--model-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pagedinfer bench: --model-config {path}: ") and message in err


def test_unreadable_model_config_exits_2(tmp_path, capsys):
    assert cli.main(["bench", "--model-config", str(tmp_path / "missing.json")]) == 2
    assert "No such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["bench", "--model-config", str(tmp_path / "bad.json")]) == 2
    assert "Expecting property name" in capsys.readouterr().err


def test_good_model_config_gets_to_the_gpu_check(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_3_8B))
    result = run_cli("bench", "--model-config", str(path), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and "needs an NVIDIA GPU" in result.stderr


def test_demo_is_wired(capsys):
    demo = pytest.importorskip("pagedinfer.demo")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0 and "usage: pagedinfer demo" in capsys.readouterr().out
    assert callable(demo.add_arguments) and callable(demo.run)
