"""llm/config/validation.py (and loader type checks): every bad config is a ConfigError naming the key."""

from __future__ import annotations

import pytest

from llm.config import ConfigError, load_config

# (overrides, text the one-line message must contain)
BAD_OVERRIDES = [
    (["model_config.peer_config.num_expertz=3"], "did you mean 'num_experts'"),
    (["model_config.peer_confg.num_experts=3"], "did you mean 'peer_config'"),
    (["trian_config.lr=1"], "did you mean 'train_config'"),
    (["train_config.lr=fast"], "train_config.lr: expected a number"),
    (["train_config.max_steps=1.5"], "train_config.max_steps: expected an integer"),
    (["train_config.max_steps=true"], "train_config.max_steps: expected an integer"),
    (["model_config.tie_embeddings=yes please"], "model_config.tie_embeddings: expected true or false"),
    (["model_config.peer_config.product_key_dim=64"], "product_key_dim: expected a list"),
    (["model_config.peer_config.product_key_dim=[64, x]"], "product_key_dim[1]: expected an integer"),
    (["model_config.peer_config.product_key_dim=[64, 64]"], "must equal num_experts=1048576"),
    (["model_config.peer_config.num_experts=64", "model_config.peer_config.product_key_dim=[8, 8]",
      "model_config.peer_config.num_experts_per_tok=65"], "num_experts_per_tok: got 65"),
    (["model_config.peer_config.num_experts_per_tok=0"], "num_experts_per_tok: got 0"),
    (["model_config.peer_config.query_dim=127"], "query_dim: got 127"),
    (["model_config.peer_config.query_norm=groupnorm"], "allowed: batchnorm | layernorm | none"),
    (["model_config.peer_config.kernel=cuda"], "allowed: auto | triton | torch"),
    (["model_config.peer_config.product_key_dim=[0, 1048576]"], "every size must be >= 1"),
    (["model_config.mla_config.qk_rope_head_dim=63"], "qk_rope_head_dim: got 63"),
    (["model_config.mla_config.q_lora_rank=-1"], "q_lora_rank: got -1"),
    (["model_config.mla_config.attention_backend=fast"], "attention_backend"),
    (["model_config.mla_config.yarn.factor=0.5"], "yarn.factor: got 0.5"),
    (["model_config.mla_config.rope_theta=1.0", "model_config.mla_config.yarn.factor=2.0"], "rope_theta: got 1.0"),
    (["model_config.peer_layers=[0, 99]"], "peer_layers"),
    (["model_config.first_k_dense=13"], "first_k_dense: got 13"),
    (["dataset_config.seq_len=4096"], "exceeds model_config.max_seq_len"),
    (["train_config.lr_schedule=linear"], "allowed: cosine | wsd | constant"),
    (["train_config.lr=-1"], "train_config.lr: got -1.0"),
    (["wandb_config.mode=loud"], "wandb_config.mode"),
    (["dataset_config.sources=[{path: a.jsonl, type: local, weight: -1}]"], "sources[0].weight"),
    (["dataset_config.sources=[{path: a.jsonl, type: local, weight: 0}]"], "sources[0].weight: got 0.0; must be a finite number > 0"),
    (["dataset_config.sources=[{path: a.jsonl, type: ftp}]"], "sources[0].type"),
    (["dataset_config.sources=[{path: a.jsonl, colour: red}]"], "sources[0].colour: unknown key"),
    (["model_config=3"], "model_config: expected a mapping"),
    (["ablation_config.axes={heads: {two: {model_config.peer_config.num_headz: 2}}}"], "ablation_config.axes.heads.two"),
    (["eval_config.top_p=0"], "eval_config.top_p"),
    (["train_config.lr=.inf"], "train_config.lr: got inf; must be a finite number"),
    (["dataset_config.sources=[{name: e, type: embedded, holdout_documents: 5}]"],
     "sources[0].holdout_documents: got 5; must be 0 for an embedded source"),
    (["dataset_config.sources=[{path: a.jsonl, type: local, min_chars: 10, max_chars: 5}]"],
     "sources[0].max_chars: got 5; must be 0 (no limit) or >= min_chars=10"),
    (["eval_config.temperature=.inf"], "eval_config.temperature: got inf; must be a finite number"),
    (["train_config.seed=4611686018427387904"], "train_config.seed: got 4611686018427387904; must be in [0, "),
    (["dataset_config.seed=-1"], "dataset_config.seed: got -1; must be in [0, "),
]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_override_is_config_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/config.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train_config:\n  lr: [1, 2\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML at line \d+"):
        load_config(path)


def test_top_level_not_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train_config:\n  output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == load_config(None)


def test_a_section_with_every_key_commented_out_gives_its_defaults(tmp_path):
    path = tmp_path / "sections.yaml"
    path.write_text("wandb_config:\n  # enabled: true\ntrain_config:\n  lr: 0.001\n")
    config = load_config(path)
    assert config.wandb_config == load_config(None).wandb_config and config.train_config.lr == 0.001


def test_a_missing_datasets_file_names_the_field(tmp_path):
    from llm.data.sources import resolve_sources

    config = load_config(None, [f"dataset_config.datasets_file={tmp_path / 'nope.yaml'}", "dataset_config.mix=web"])
    with pytest.raises(ConfigError, match=r"^dataset_config\.datasets_file: .*nope\.yaml' does not exist"):
        resolve_sources(config.dataset_config)


def test_override_into_scalar_is_error():
    with pytest.raises(ConfigError, match="train_config.lr: expected a number"):
        load_config(None, ["train_config.lr.x=1"])
