"""Models Wenmai will not load say why: code shipped with the model (unless the recipe trusts it) and
pickle-only weights (never loaded), each one clear error naming model.path."""

from __future__ import annotations

import json

import pytest
from tiny_models import build_model

from finetune.errors import WenmaiError
from finetune.model import load_model, load_tokenizer, resolve_source
from finetune.recipe import ModelSection


def test_a_model_that_ships_its_own_code_is_refused_saying_how_to_trust_it(tmp_path):
    folder = build_model(tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config.update(model_type="wenmai_custom", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                         "AutoModelForCausalLM": "modeling_x.XModel"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "configuration_x.py").write_text("raise SystemExit('this code must never run')\n", encoding="utf-8")
    section = ModelSection(path=str(folder))
    with pytest.raises(
        WenmaiError, match=r"model\.path: .* ships its own Python code .*model\.trust_remote_code: true"
    ):
        load_model(section, resolve_source(section))


def test_pickle_only_weights_are_never_loaded(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    folder = build_model(tmp_path / "pickled")
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    section = ModelSection(path=str(folder))
    with pytest.raises(WenmaiError, match=r"only pickle weights \(pytorch_model\.bin\).*never loads it"):
        load_model(section, resolve_source(section))
    with pytest.raises(WenmaiError, match="only pickle weights"):
        load_tokenizer(section, resolve_source(section))
