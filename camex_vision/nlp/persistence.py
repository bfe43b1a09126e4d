"""Saving, loading and folding converted language models.

``model.save_pretrained(path)`` saves a converted model as usual: the converted FFNs are ordinary modules, so their
parameters go into ``model.safetensors`` and the conversion options into ``config.json`` (``"camex"``).
``from_pretrained(path)`` rebuilds the model: the transformers class named in the config, ``camexify`` with the
recorded options, then the saved weights, checked strictly.
"""
import json
import os
from typing import Dict, Optional, Type, Union

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, PreTrainedModel

from ..core import MergedLinear
from ..core import reparameterize as _reparameterize_core
from .convert import CONFIG_KEY, SUPPORTED_MODELS, camex_options, camexify

_WEIGHTS = 'model.safetensors'
_INDEX = 'model.safetensors.index.json'


def reparameterize(model: PreTrainedModel) -> PreTrainedModel:
    """``camex_vision.reparameterize`` for a converted language model, recorded in its config.

    Folds curvature, TIES mask, alpha and dynamic chains into plain Euclidean experts (eval outputs unchanged) and
    sets ``config.camex['reparameterized']`` so ``from_pretrained`` rebuilds the folded structure.
    """
    camex_options(model)  # raises for a model camexify did not convert
    _reparameterize_core(model)
    getattr(model.config, CONFIG_KEY)['reparameterized'] = True
    return model


def _read_weights(path: str) -> Dict[str, torch.Tensor]:
    single = os.path.join(path, _WEIGHTS)
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        with open(index, encoding='utf-8') as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
        state: Dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    raise FileNotFoundError(f'{path} has neither {_WEIGHTS} nor {_INDEX}; save the model with save_pretrained')


def _is_folded(model: PreTrainedModel, state: Dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds folded experts (curvature gone, dynamic bases owned) where ``model`` has unfolded ones.

    Detects a model folded with the plain ``camex_vision.reparameterize`` and saved without the config flag.
    """
    for name, module in model.named_modules():
        if not isinstance(module, MergedLinear):
            continue
        if module.curvature is not None and not any(k.startswith(f'{name}.curvature.') for k in state):
            return True
        if not module.owns_base and f'{name}.weight_base' in state:
            return True
    return False


def from_pretrained(
        path: Union[str, os.PathLike],
        model_class: Optional[Type[PreTrainedModel]] = None,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[str, torch.device]] = None,
) -> PreTrainedModel:
    """Load a model converted by ``camexify`` and saved with ``save_pretrained``; the result equals the saved model.

    Args:
        path: the directory written by ``save_pretrained``.
        model_class: the transformers class; default the one recorded in the config (``architectures``).
        dtype: cast to this dtype; default the dtype of the saved weights.
        device: move to this device.

    Returns:
        The converted model in eval mode, as ``from_pretrained`` of transformers returns models.

    Raises:
        ValueError: the directory does not hold a converted model, or its weights do not match the recorded options.
    """
    path = os.fspath(path)
    config = AutoConfig.from_pretrained(path)
    options = getattr(config, CONFIG_KEY, None)
    if not isinstance(options, dict):
        raise ValueError(f'{path} holds a dense model (its config has no "{CONFIG_KEY}" entry); load it with '
                         f'transformers and convert it with camexify')
    if model_class is None:
        names = {c.__name__: c for c in SUPPORTED_MODELS}
        arch = (getattr(config, 'architectures', None) or [None])[0]
        if arch not in names:
            raise ValueError(f'{path}: config architecture {arch!r} is not one camexify supports ({", ".join(names)})')
        model_class = names[arch]
    options = dict(options)
    folded = bool(options.pop('reparameterized', False))
    model = model_class(config)
    camexify(model, **options)
    state = _read_weights(path)
    if folded or _is_folded(model, state):
        reparameterize(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained drops tied duplicates (lm_head.weight -> transformer.wte.weight): fine if an alias was loaded
    aliases: Dict[int, set] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), set()).add(name)
    by_name = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    missing = [k for k in missing if not (k in by_name and aliases[id(by_name[k])] & state.keys())]
    if missing or unexpected:
        raise ValueError(f'{path}: saved weights do not match a {model_class.__name__} converted with {options}: '
                         f'missing {missing[:8]}{"..." if len(missing) > 8 else ""}, '
                         f'unexpected {unexpected[:8]}{"..." if len(unexpected) > 8 else ""}')
    saved_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if dtype is None and len(saved_dtypes) == 1:
        dtype = saved_dtypes.pop()
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()
