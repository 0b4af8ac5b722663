"""What a converted checkpoint tells Megatron-LM and Megatron-Bridge, and the checkpoints they
write read back: Megatron-LM's own argument code rebuilds every model family's
TransformerConfig from the saved ``args`` plus the flags the converter prints; vocabulary
paddings (this project's, a multiple of 64 for a small vocabulary, Megatron-LM's 128 x TP
rule, Bridge's unpadded) load into each other with HF's logits and convert to HF
bit-identically; a checkpoint in Bridge's layout (``run_config.yaml`` in its newer builder
form, no ``megatron_sppo.json``, no ``args``) converts and builds a policy and a critic;
uneven pipeline stages follow Megatron-LM's rules; a wrong HF config is refused in one line."""

from __future__ import annotations

import dataclasses
import shutil
import sys

import pytest
import torch
import transformers
import yaml
from helpers import assert_bit_identical, load_hf_tensors

from megatron_sppo.cli import main as cli_main
from megatron_sppo.errors import UserError

FAMILIES = ["qwen2_gqa_untied", "qwen3_headdim32", "llama_rope_llama3", "mistral_gqa_tied",
            "llama_mha_untied"]
CONFIG_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "kv_channels", "layernorm_epsilon", "normalization",
                 "gated_linear_unit", "activation_func", "add_bias_linear", "add_qkv_bias",
                 "qk_layernorm", "hidden_dropout", "attention_dropout")


def _convert(hf, out) -> None:
    assert cli_main(["convert", "hf-to-megatron", "--hf-path", str(hf), "--megatron-path",
                     str(out), "--no-progress"]) == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_megatron_lm_rebuilds_the_model_from_the_checkpoint_args(zoo, tmp_path, monkeypatch,
                                                                 capsys, name):
    """megatron.training's --use-checkpoint-args + the flags hf-to-megatron prints give the
    TransformerConfig and GPTModel settings this project builds."""
    from megatron.training import arguments
    from megatron.training.checkpointing import load_args_from_checkpoint

    from megatron_sppo.checkpoint.megatron_io import describe_checkpoint
    from megatron_sppo.models.builder import transformer_config

    _convert(zoo[name], tmp_path / "mg")
    printed = capsys.readouterr().out.split("--use-checkpoint-args")[1].split()
    arch = describe_checkpoint(tmp_path / "mg").arch
    monkeypatch.setattr(sys, "argv", [
        "pretrain_gpt.py", "--load", str(tmp_path / "mg"), "--use-checkpoint-args",
        "--finetune", *printed, "--micro-batch-size", "1", "--seq-length", "16",
        "--transformer-impl", "local", "--no-persist-layer-norm", "--no-rope-fusion",
        "--no-gradient-accumulation-fusion"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = arguments.parse_args()
    load_args_from_checkpoint(args)
    arguments.validate_args(args, {})
    theirs, ours = arguments.core_transformer_config_from_args(args), transformer_config(arch)
    for field in CONFIG_FIELDS:
        assert getattr(theirs, field) == getattr(ours, field), field
    assert args.padded_vocab_size == arch.padded_vocab_size
    assert args.untie_embeddings_and_output_weights == (not arch.tie_embeddings)
    assert args.position_embedding_type == "rope" and args.rotary_base == arch.rope_theta
    assert args.use_rope_scaling == (arch.rope_scaling_factor is not None)
    if arch.rope_scaling_factor is not None:
        assert args.rope_scaling_factor == arch.rope_scaling_factor
    assert args.tokenizer_type == "HuggingFaceTokenizer"
    assert args.tokenizer_model == str(tmp_path / "mg" / "iter_0000000" / "hf_config")


def _model(hf, padded: int, fill: bool = True):
    """(arch, GPTModel) of ``hf`` with ``padded`` vocabulary rows, filled from HF or random."""
    from megatron_sppo.checkpoint.convert import load_hf_weights
    from megatron_sppo.checkpoint.hf_io import HFCheckpointReader
    from megatron_sppo.models import arch_from_hf_config, build_gpt_model, load_hf_config
    from megatron_sppo.models import transformer_config

    arch = dataclasses.replace(arch_from_hf_config(load_hf_config(hf)), padded_vocab_size=padded)
    model = build_gpt_model(arch, transformer_config(arch))
    if fill:
        load_hf_weights(model, HFCheckpointReader(hf), arch)
    return arch, model


# GPTModelProvider's own fields (NVIDIA-NeMo/Megatron-Bridge models/gpt_provider.py) that
# run_config.yaml uses; every other model key must be a megatron-core TransformerConfig field
BRIDGE_PROVIDER_FIELDS = {"share_embeddings_and_output_weights", "position_embedding_type",
                          "rotary_base", "rotary_percent", "rope_scaling", "rope_scaling_factor",
                          "vocab_size", "should_pad_vocab", "make_vocab_size_divisible_by",
                          "seq_length", "hf_model_id"}


def test_run_config_is_a_gpt_model_provider(zoo, tmp_path):
    from megatron.core.transformer import TransformerConfig

    _convert(zoo["llama_rope_llama3"], tmp_path / "mg")
    config = yaml.safe_load((tmp_path / "mg/iter_0000000/run_config.yaml").read_text())
    model = config["model"]
    assert model["_target_"] == "megatron.bridge.models.gpt_provider.GPTModelProvider"
    fields = set(TransformerConfig.__dataclass_fields__) | BRIDGE_PROVIDER_FIELDS
    assert set(model) - {"_target_"} <= fields, set(model) - fields
    assert model["activation_func"] == {"_target_": "torch.nn.functional.silu", "_call_": False}
    assert (model["vocab_size"], model["should_pad_vocab"]) == (263, False)
    assert model["rope_scaling"] is True and model["rope_scaling_factor"] == 8.0
    hf_config = str(tmp_path / "mg/iter_0000000/hf_config")
    assert model["hf_model_id"] == config["tokenizer"]["tokenizer_model"] == hf_config


def _saved_at_padding(hf, out, padded: int, writer: str):
    """``hf`` stored with ``padded`` vocabulary rows the way ``writer`` leaves it:
    "megatron_sppo" (everything), "megatron-lm" (args, no megatron_sppo.json), "bridge"
    (run_config.yaml only)."""
    from megatron.core import dist_checkpointing

    from megatron_sppo.checkpoint.megatron_io import save_model_checkpoint, write_tracker
    from megatron_sppo.runtime.groups import global_groups

    arch, model = _model(hf, padded)
    if writer == "bridge":  # no args: Bridge keeps its config in run_config.yaml only
        iter_dir = out / "iter_0000000"
        iter_dir.mkdir(parents=True)
        dist_checkpointing.save({"model": global_groups().sharded_state_dict(model),
                                 "iteration": 0, "checkpoint_version": 3.0}, str(iter_dir))
        (iter_dir / "run_config.yaml").write_text(yaml.safe_dump(_bridge_builder_form(arch, hf)))
        write_tracker(out, 0)
        return arch
    iter_dir = save_model_checkpoint(model, out, 0, arch, hf)
    if writer == "megatron-lm":  # the tokenizer directory args.tokenizer_model names stays
        for own in ("megatron_sppo.json", "run_config.yaml"):
            (iter_dir / own).unlink()
    return arch


def _bridge_builder_form(arch, hf) -> dict:
    """A run_config.yaml as Megatron-Bridge's builder-backed configs serialise a model
    (BridgeGPTModelConfig: outer build fields, TransformerConfig fields nested)."""
    return {"model": {
        "_target_": "megatron.bridge.models.gpt.model_config.BridgeGPTModelConfig",
        "_builder_": "megatron.bridge.models.gpt.gpt_builder.GPTModelBuilder",
        "vocab_size": arch.vocab_size, "should_pad_vocab": False,
        "share_embeddings_and_output_weights": arch.tie_embeddings,
        "extra_checkpoint_metadata": {"hf_model_id": str(hf)},
        "transformer": {
            "_target_": "megatron.bridge.models.transformer_config.TransformerConfig",
            "num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
            "ffn_hidden_size": arch.ffn_hidden_size, "num_attention_heads": arch.num_heads,
            "num_query_groups": arch.num_kv_heads, "kv_channels": arch.head_dim,
            "add_qkv_bias": arch.qkv_bias, "qk_layernorm": arch.qk_layernorm,
            "activation_func": "silu", "normalization": "RMSNorm"}},
        "tokenizer": {"tokenizer_type": "HuggingFaceTokenizer",
                      "tokenizer_model": str(hf / "tokenizer")}}


def _paddings(vocab: int) -> dict[str, int]:
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    from megatron_sppo.models.hf_config import padded_vocab

    return {"megatron_sppo": padded_vocab(vocab),
            "megatron-lm": calculate_padded_vocab_size(vocab, 128, 1, logging_enabled=False),
            "bridge": vocab}


@pytest.fixture()
def stored(zoo, tmp_path, megatron_tp1):
    """qwen2 stored at every padding, each in its writer's layout."""
    hf = zoo["qwen2_gqa_untied"]
    vocab = transformers.AutoConfig.from_pretrained(hf).vocab_size
    paddings = _paddings(vocab)
    assert len(set(paddings.values())) == 3  # 320, 384, 263
    return hf, vocab, {writer: (tmp_path / writer, padded, _saved_at_padding(
        hf, tmp_path / writer, padded, writer)) for writer, padded in paddings.items()}


def test_every_vocabulary_padding_loads_into_every_other(stored):
    from megatron_sppo.checkpoint.megatron_io import load_model_checkpoint, resolve_checkpoint
    from megatron_sppo.models.inputs import causal_inputs

    hf, vocab, checkpoints = stored
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():
        reference = model.eval()(ids).logits
    for writer, (path, _, _) in checkpoints.items():
        for _, padded, _ in checkpoints.values():
            _, target = _model(hf, padded, fill=False)
            for p in target.parameters():  # every weight must come from the checkpoint
                torch.nn.init.normal_(p)
            load_model_checkpoint(target, resolve_checkpoint(path))
            with torch.no_grad():
                logits = target(ids, *causal_inputs(ids))
            assert logits.shape[-1] == padded, (writer, padded)
            assert (logits[..., :vocab] - reference).abs().max() <= 1e-4, (writer, padded)
            assert bool((logits[..., vocab:] == 0).all()), (writer, padded)


def test_every_writer_and_padding_converts_to_hf(stored, tmp_path):
    hf, _, checkpoints = stored
    for writer, (path, _, _) in checkpoints.items():
        out = tmp_path / f"hf-{writer}"
        assert cli_main(["convert", "megatron-to-hf", "--megatron-path", str(path),
                         "--hf-path", str(out), "--no-progress"]) == 0, writer
        assert_bit_identical(load_hf_tensors(hf), load_hf_tensors(out))
        assert (out / "config.json").read_bytes() == (hf / "config.json").read_bytes()


def test_a_bridge_checkpoint_builds_a_policy_and_a_critic(stored):
    from megatron_sppo.config import ModelConfig
    from megatron_sppo.trainer.models import build_module

    hf, vocab, checkpoints = stored
    path = str(checkpoints["bridge"][0])
    policy, arch = build_module(ModelConfig(checkpoint=path), path)
    critic, _ = build_module(ModelConfig(checkpoint=path), path, critic=True, prefix="critic")
    reference = load_hf_tensors(hf)["model.embed_tokens.weight"]
    for model in (policy, critic):
        embedding = model.embedding.word_embeddings.weight
        assert embedding.shape[0] == arch.padded_vocab_size == 320
        assert torch.equal(embedding[:vocab], reference) and not embedding[vocab:].any()


def test_a_checkpoint_with_another_models_config_is_refused(zoo, tmp_path, capsys):
    _convert(zoo["qwen2_gqa_untied"], tmp_path / "mg")
    shutil.rmtree(tmp_path / "mg" / "iter_0000000" / "hf_config")
    assert cli_main(["convert", "megatron-to-hf", "--megatron-path", str(tmp_path / "mg"),
                     "--hf-path", str(tmp_path / "o"), "--hf-config",
                     str(zoo["qwen3_headdim32"]), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--hf-config" in err, err
    assert not (tmp_path / "o").exists()


def test_a_foreign_checkpoint_without_a_description_is_refused(zoo, tmp_path, megatron_tp1):
    from megatron.core import dist_checkpointing

    from megatron_sppo.checkpoint.convert import model_from_hf
    from megatron_sppo.checkpoint.megatron_io import describe_checkpoint, write_tracker
    from megatron_sppo.runtime.groups import global_groups

    _, _, model = model_from_hf(zoo["qwen2_gqa_untied"])
    (tmp_path / "iter_0000003").mkdir()
    dist_checkpointing.save({"model": global_groups().sharded_state_dict(model),
                             "iteration": 3}, str(tmp_path / "iter_0000003"))
    write_tracker(tmp_path, 3)
    with pytest.raises(UserError, match="records no model.*--hf-config"):
        describe_checkpoint(tmp_path)
    info = describe_checkpoint(tmp_path, hf_config=zoo["qwen2_gqa_untied"])
    assert info.writer == "megatron-lm" and info.kind == "policy"


# ---- uneven pipeline stages -----------------------------------------------------------------


@pytest.mark.parametrize("layers,pp,first,last,expected", [
    (4, 2, None, None, [2, 2]),   # even: megatron's own split
    (3, 2, None, None, [2, 1]),   # default: the first stage takes the remainder
    (10, 4, None, None, [4, 2, 2, 2]),
    (3, 2, None, 2, [1, 2]),
    (10, 4, 1, 3, [1, 3, 3, 3]),
    (9, 3, 3, None, [3, 3, 3]),
])
def test_stage_splits(layers, pp, first, last, expected):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    from megatron_sppo.models.stages import layers_per_stage, stage_split

    split = stage_split(layers, pp, first, last)
    assert layers_per_stage(layers, pp, split) == expected
    config = TransformerConfig(num_layers=layers, hidden_size=8, num_attention_heads=1,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               **split.config_kwargs())  # megatron-core checks the split too
    assert [get_num_layers_to_build(config, pp_rank=r) for r in range(pp)] == expected


@pytest.mark.parametrize("layers,pp,first,last,needle", [
    (3, 4, None, None, "--pp 4 is more than num_hidden_layers=3"),
    (10, 4, 2, None, "leave 8 of the 10 layers to 3 other"),
    (4, 2, 1, 1, "leave 2 of the 4 layers to 0 other"),
    (4, 2, 0, None, "--decoder-first-pipeline-num-layers=0"),
    (4, 1, 2, None, "need --pp > 1"),
])
def test_impossible_stage_splits_are_refused(layers, pp, first, last, needle):
    from megatron_sppo.models.stages import stage_split

    with pytest.raises(UserError, match=needle.replace("+", r"\+")) as e:
        stage_split(layers, pp, first, last)
    assert "\n" not in str(e.value)
