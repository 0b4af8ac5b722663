"""HF <-> Megatron conversion: bit-identical round trips, Megatron-LM's layout, sharded HF
output that transformers loads, and one clear error line for every bad input."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import transformers
from helpers import REPO, assert_bit_identical, load_hf_tensors, run

from megatron_sppo.cli import main as cli_main
from megatron_sppo.models.tiny import make_tiny_hf_model


def _roundtrip(hf_dir, tmp_path, *flags):
    mg, back = tmp_path / "mg", tmp_path / "back"
    assert cli_main(["convert", "hf-to-megatron", "--hf-path", str(hf_dir), "--megatron-path",
                     str(mg), "--no-progress", *flags]) == 0
    assert cli_main(["convert", "megatron-to-hf", "--megatron-path", str(mg), "--hf-path",
                     str(back), "--no-progress"]) == 0
    return mg, back


@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_mha_tied", "qwen3_headdim32",
                                  "mistral_gqa_tied", "llama_rope_llama3"])
def test_roundtrip_is_bit_identical(zoo, tmp_path, name):
    mg, back = _roundtrip(zoo[name], tmp_path)
    assert_bit_identical(load_hf_tensors(zoo[name]), load_hf_tensors(back))
    assert (back / "config.json").read_bytes() == (zoo[name] / "config.json").read_bytes()
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / f).read_bytes() == (zoo[name] / f).read_bytes(), f
    assert not list(tmp_path.glob(".*")), "temporary directories left behind"


def test_bf16_roundtrip_keeps_dtype_and_from_pretrained_loads(tmp_path):
    hf = make_tiny_hf_model(tmp_path / "bf16", family="qwen2", dtype=torch.bfloat16)
    _, back = _roundtrip(hf, tmp_path)
    tensors = load_hf_tensors(back)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert_bit_identical(load_hf_tensors(hf), tensors)
    model = transformers.AutoModelForCausalLM.from_pretrained(back)
    assert model.dtype == torch.bfloat16


def test_dtype_override_exports_in_the_original_dtype(zoo, tmp_path):
    hf = zoo["llama_gqa_untied"]
    _, back = _roundtrip(hf, tmp_path, "--dtype", "bfloat16")
    original, exported = load_hf_tensors(hf), load_hf_tensors(back)
    for name, tensor in original.items():
        assert exported[name].dtype == torch.float32
        if tensor.dim() == 1:  # megatron-core's local-spec norms keep fp32 weights
            assert torch.equal(exported[name], tensor), name
        else:
            assert torch.equal(exported[name], tensor.to(torch.bfloat16).float()), name


def test_megatron_lm_layout(zoo, tmp_path, megatron_tp1):
    from megatron.core import dist_checkpointing

    mg, _ = _roundtrip(zoo["qwen2_gqa_untied"], tmp_path)
    assert (mg / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    iter_dir = mg / "iter_0000000"
    assert (iter_dir / "metadata.json").is_file()
    common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    assert common["iteration"] == 0 and common["checkpoint_version"] == 3.0
    keys = dist_checkpointing.load_tensors_metadata(str(iter_dir))
    assert "embedding.word_embeddings.weight" in keys
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert keys["embedding.word_embeddings.weight"].global_shape[0] % 64 == 0
    meta = json.loads((iter_dir / "megatron_sppo.json").read_text())
    assert meta["arch"]["padded_vocab_size"] == keys["embedding.word_embeddings.weight"].global_shape[0]
    assert (iter_dir / "hf_config" / "config.json").is_file()


def test_spawned_tp2_pp2_roundtrip_and_sharded_export(zoo, tmp_path):
    """A single process writes TP=2 x PP=2 through 4 spawned workers; the export into many
    small shards is bit-identical and loads in transformers with the original logits."""
    hf = zoo["qwen3_mha_untied"]
    mg, back = tmp_path / "mg", tmp_path / "back"
    cli = [sys.executable, "-m", "megatron_sppo", "convert"]
    run([*cli, "hf-to-megatron", "--hf-path", hf, "--megatron-path", mg, "--tp", "2", "--pp",
         "2", "--no-progress"])
    assert json.loads((mg / "iter_0000000" / "megatron_sppo.json").read_text())["saved_pp"] == 2
    run([*cli, "megatron-to-hf", "--megatron-path", mg, "--hf-path", back,
         "--max-shard-size", "64KB", "--no-progress"])
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert_bit_identical(load_hf_tensors(hf), load_hf_tensors(back))
    ids = torch.randint(0, 200, (1, 9))
    a = transformers.AutoModelForCausalLM.from_pretrained(hf)(ids).logits
    b = transformers.AutoModelForCausalLM.from_pretrained(back)(ids).logits
    assert torch.equal(a, b)


def test_tools_scripts_have_the_public_flags():
    for tool in ("convert_hf_to_megatron.py", "convert_megatron_to_hf.py"):
        out = run([sys.executable, REPO / "tools" / tool, "--help"]).stdout
        for flag in ("--hf-path", "--megatron-path", "--overwrite"):
            assert flag in out, (tool, flag)
    assert "--tp" in run([sys.executable, REPO / "tools" / "convert_hf_to_megatron.py",
                          "--help"]).stdout


# ---- bad input ---------------------------------------------------------------------------


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _fails(capsys, argv, *needles, out=None):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    if out is not None:
        assert not out.exists(), "output written despite the error"
        assert not list(out.parent.glob(f".{out.name}*")), "temporary output left behind"
    return err


def _h2m(hf, out, *flags):
    return ["convert", "hf-to-megatron", "--hf-path", str(hf), "--megatron-path", str(out),
            "--no-progress", *flags]


@pytest.mark.parametrize("changes,needles", [
    (dict(architectures=["GPT2LMHeadModel"]), ["unsupported architecture", "Qwen2ForCausalLM"]),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     ["'yarn'", "llama3"]),
    (dict(sliding_window=16, use_sliding_window=True), ["sliding window"]),
    (dict(num_local_experts=8), ["MoE"]),
    (dict(hidden_act="gelu"), ["hidden_act"]),
])
def test_unsupported_models_are_refused(zoo, tmp_path, capsys, changes, needles):
    hf = _edit_config(zoo["qwen2_gqa_untied"], tmp_path / "bad", **changes)
    _fails(capsys, _h2m(hf, tmp_path / "out"), *needles, out=tmp_path / "out")


@pytest.mark.parametrize("flags,needles", [
    (("--tp", "3"), ["--tp 3", "num_attention_heads=4"]),
    (("--tp", "4"), ["--tp 4", "num_key_value_heads=2"]),
    (("--pp", "3"), ["--pp 3", "num_hidden_layers=2"]),
])
def test_impossible_parallel_sizes(zoo, tmp_path, capsys, flags, needles):
    out = tmp_path / "out"
    _fails(capsys, _h2m(zoo["qwen2_gqa_untied"], out, *flags), *needles, out=out)


def test_missing_and_truncated_shards(zoo, tmp_path, capsys):
    sharded = tmp_path / "sharded"
    assert cli_main(["convert", "megatron-to-hf", "--megatron-path", str(_roundtrip(
        zoo["llama_gqa_untied"], tmp_path)[0]), "--hf-path", str(sharded),
        "--max-shard-size", "64KB", "--no-progress"]) == 0
    shards = sorted(sharded.glob("model-*.safetensors"))
    missing = tmp_path / "missing"
    shutil.copytree(sharded, missing)
    (missing / shards[1].name).unlink()
    _fails(capsys, _h2m(missing, tmp_path / "o1"), "missing safetensors shard", shards[1].name,
           out=tmp_path / "o1")
    truncated = tmp_path / "truncated"
    shutil.copytree(sharded, truncated)
    data = (truncated / shards[2].name).read_bytes()
    (truncated / shards[2].name).write_bytes(data[: len(data) // 2])
    _fails(capsys, _h2m(truncated, tmp_path / "o2"), "truncated", shards[2].name,
           out=tmp_path / "o2")


def test_config_weight_shape_mismatch(zoo, tmp_path, capsys):
    hf = _edit_config(zoo["qwen2_gqa_untied"], tmp_path / "bad", intermediate_size=96)
    _fails(capsys, _h2m(hf, tmp_path / "out"), "shape mismatch", "mlp.gate_proj.weight",
           out=tmp_path / "out")


def test_existing_output_needs_overwrite(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert cli_main(_h2m(zoo["qwen2_gqa_untied"], out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert cli_main(_h2m(zoo["qwen2_gqa_untied"], out, "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and (out / "latest_checkpointed_iteration.txt").exists()
    back = tmp_path / "back"
    back.mkdir()
    (back / "x").write_text("x")
    m2h = ["convert", "megatron-to-hf", "--megatron-path", str(out), "--hf-path", str(back),
           "--no-progress"]
    assert cli_main(m2h) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main([*m2h, "--overwrite"]) == 0


def test_megatron_checkpoint_without_hf_config(zoo, tmp_path, capsys):
    mg, _ = _roundtrip(zoo["qwen2_gqa_untied"], tmp_path)
    shutil.rmtree(mg / "iter_0000000" / "hf_config")
    out = tmp_path / "hf_out"
    m2h = ["convert", "megatron-to-hf", "--megatron-path", str(mg), "--hf-path", str(out),
           "--no-progress"]
    _fails(capsys, m2h, "--hf-config", out=out)
    assert cli_main([*m2h, "--hf-config", str(zoo["qwen2_gqa_untied"])]) == 0
    assert_bit_identical(load_hf_tensors(zoo["qwen2_gqa_untied"]), load_hf_tensors(out))


def test_critic_checkpoint_is_not_exported(zoo, tmp_path, capsys, megatron_tp1):
    from megatron_sppo.checkpoint.convert import model_from_hf
    from megatron_sppo.checkpoint.megatron_io import save_model_checkpoint

    arch, _, critic = model_from_hf(zoo["qwen2_gqa_untied"], critic=True)
    save_model_checkpoint(critic, tmp_path / "critic", 3, arch, zoo["qwen2_gqa_untied"])
    _fails(capsys, ["convert", "megatron-to-hf", "--megatron-path", str(tmp_path / "critic"),
                    "--hf-path", str(tmp_path / "o"), "--no-progress"], "critic",
           out=tmp_path / "o")


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["convert", "megatron-to-hf", "--megatron-path", str(tmp_path / "empty"),
                    "--hf-path", str(tmp_path / "o")], "latest_checkpointed_iteration.txt")
    _fails(capsys, _h2m(tmp_path / "empty", tmp_path / "o"), "config.json")


def test_cli_exit_code_and_single_line(zoo, tmp_path):
    proc = run([sys.executable, "-m", "megatron_sppo", "convert", "hf-to-megatron", "--hf-path",
                zoo["qwen2_gqa_untied"], "--megatron-path", tmp_path / "o", "--tp", "3"],
               check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --tp 3")
