"""Which modality each parameter belongs to: ``param_labels`` for cggm and the baselines.

Modality-aware transforms (:func:`bogc_jax.cggm`, :func:`bogc_jax.ogm_ge`,
:func:`bogc_jax.mmpareto`) need to know which encoder every parameter belongs to. Like
``optax.partition``'s labels, ``param_labels`` is a pytree (or a callable
``params -> pytree``) whose leaves are

- an ``int`` ``i >= 0``: the parameter belongs to modality ``i``'s encoder;
- ``None``: the parameter is shared (fusion module, output head, ...); the transforms
  leave its gradient alone.

The labels tree may stop early: a label leaf placed where the parameter tree still has a
subtree applies to every parameter in that subtree, so ``{"audio": 0, "video": 1,
"head": None}`` labels a whole ``params`` dict with those three top-level entries. The
same labels therefore fit a Flax NNX state whether or not its ``Variable`` boxes have been
stripped (``nnx.Optimizer`` initialises with the boxed state and updates with the bare
one).

:func:`label_params` builds the labels from parameter paths (``"encoders/0"``), for plain
pytrees and for Flax NNX modules alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from bogc_jax._types import Label, ParamLabels, PyTree, is_params_placeholder

INDEX = "index"
"""Rule value for :func:`label_params`: label = the integer key that follows the prefix."""

_RAISE = object()


def _is_none(x) -> bool:
    return x is None


def _key_str(key) -> str:
    """One path entry as a string: dict keys, sequence indices and attribute names."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(path) -> str:
    return "/".join(_key_str(k) for k in path) or "<root>"


def _check_label(label, where: str, argname: str) -> Label:
    if label is None:
        return None
    if np.ndim(label) != 0:
        raise TypeError(
            f"{argname}{where} is an array of shape {np.shape(label)}; every leaf of "
            f"{argname} must be one modality index (int >= 0) or None (a shared parameter), "
            "for the whole parameter array. To label parts of a parameter differently, "
            "split it into separate parameters."
        )
    if isinstance(label, (bool, np.bool_)) or not hasattr(label, "__index__"):
        raise TypeError(
            f"{argname}{where} is {label!r} of type {type(label).__name__}; every leaf of "
            f"{argname} must be a modality index (int >= 0) or None (a shared parameter)."
        )
    label = int(label.__index__())
    if label < 0:
        raise ValueError(
            f"{argname}{where} is {label}; modality indices start at 0. Use None for "
            "shared parameters."
        )
    return label


def _norm_path(path) -> tuple[str, ...]:
    """Path keys as strings, without the ``.value`` step of Flax ``Variable`` boxes."""
    return tuple(
        _key_str(k)
        for k in path
        if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")
    )


def leaf_labels(
    param_labels: ParamLabels, tree: PyTree, argname: str = "param_labels"
) -> list[Label]:
    """The label of every leaf of ``tree``, in ``jax.tree.leaves(tree)`` order.

    The labels must have ``tree``'s structure or a prefix of it. When the container types
    differ (a plain dict of labels for an ``nnx.State``, boxed ``Variable`` leaves) the
    labels are matched by key path instead: each leaf takes the label at the longest
    labelled prefix of its path.

    Args:
      param_labels: pytree of ``int | None``, or a callable ``tree -> labels``.
      tree: the parameters, or anything shaped like them (gradients, updates).
      argname: the argument name used in error messages.

    Returns:
      One ``int`` or ``None`` per leaf of ``tree``.

    Raises:
      ValueError / TypeError: at trace time, naming the offending leaf, when the labels do
        not fit ``tree`` or a leaf is not an ``int >= 0`` or ``None``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> params = {"audio": {"w": jnp.ones(2), "b": jnp.ones(1)}, "head": jnp.ones(3)}
      >>> bj.labels.leaf_labels({"audio": 0, "head": None}, params)
      [0, 0, None]
    """
    labels = param_labels(tree) if callable(param_labels) else param_labels
    flat, treedef = jax.tree_util.tree_flatten_with_path(labels, is_leaf=_is_none)
    checked = [
        (path, _check_label(label, jax.tree_util.keystr(path), argname)) for path, label in flat
    ]
    try:
        subtrees = treedef.flatten_up_to(tree)  # type: ignore[attr-defined]
    except (ValueError, TypeError):
        subtrees = None
    if subtrees is not None:
        result = []
        for (_, label), subtree in zip(checked, subtrees):
            result.extend([label] * len(jax.tree.leaves(subtree)))
        return result
    by_path = {_norm_path(path): label for path, label in checked}
    result, missing = [], []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = _norm_path(path)
        for k in range(len(keys), -1, -1):
            if keys[:k] in by_path:
                result.append(by_path[keys[:k]])
                break
        else:
            missing.append(_path_str(keys))
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(
            f"{argname} does not fit the parameter tree: {len(missing)} parameter(s) have no "
            f"label: {shown}. {argname} must have the structure of the parameters (or a "
            "prefix of it), with an int (modality) or None (shared) at each leaf; got "
            f"labels {treedef}. Build them with bogc_jax.label_params(params, rules) or pass "
            "a callable params -> labels."
        )
    return result


def num_modalities(labels: Sequence[Label], argname: str = "param_labels", minimum: int = 2) -> int:
    """``M = max label + 1``, checked to be at least ``minimum`` with no modality unused.

    Example:
      >>> import bogc_jax as bj
      >>> bj.labels.num_modalities([0, None, 2, 1])
      3
    """
    used = sorted({label for label in labels if label is not None})
    if not used or used[-1] + 1 < minimum:
        raise ValueError(
            f"{argname} label the parameters with modalities {used}; at least {minimum} "
            f"modalities (labels 0..{minimum - 1}) are needed. Label each encoder's "
            "parameters with its modality index, e.g. bogc_jax.label_params(params, "
            "{'encoders': bogc_jax.labels.INDEX, 'head': None})."
        )
    empty = sorted(set(range(used[-1] + 1)) - set(used))
    if empty:
        raise ValueError(
            f"{argname} label the parameters with modalities {used}, so M = {used[-1] + 1}, "
            f"but no parameter has modality {empty}: every modality 0..M-1 needs an encoder "
            f"parameter (labels name modalities by their index). Renumber the labels "
            f"0..{len(used) - 1}, or label the missing encoder's parameters (a parameter "
            "labelled None is treated as shared and never modulated)."
        )
    return used[-1] + 1


def modality_count(param_labels: ParamLabels, params: PyTree, argname: str = "param_labels") -> int:
    """``M`` for a transform's ``init``: :func:`num_modalities` of the labels of ``params``.

    Under ``optax.tree.map_params`` (whose stand-in params carry no labels) it returns 2: the
    states of the modality transforms hold no parameter copies, only their structure matters.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> bj.labels.modality_count({"a": 0, "b": 1}, {"a": jnp.ones(2), "b": jnp.ones(3)})
      2
    """
    if is_params_placeholder(params):
        return 2
    return num_modalities(leaf_labels(param_labels, params, argname), argname)


def map_labelled(
    fn: Callable[..., Any], labels: Sequence[Label], tree: PyTree, *rest: PyTree
) -> PyTree:
    """``fn(label, leaf, *rest_leaves)`` for every leaf; ``rest`` trees shaped like ``tree``.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> grads = {"audio": jnp.ones(2), "head": jnp.ones(2)}
      >>> labels = bj.labels.leaf_labels({"audio": 0, "head": None}, grads)
      >>> scale = lambda label, g: g if label is None else 2.0 * g
      >>> {k: v.tolist() for k, v in bj.labels.map_labelled(scale, labels, grads).items()}
      {'audio': [2.0, 2.0], 'head': [1.0, 1.0]}
    """
    leaves, treedef = jax.tree.flatten(tree)
    rest_leaves = [treedef.flatten_up_to(r) for r in rest]  # type: ignore[attr-defined]
    out = [fn(label, leaf, *others) for label, leaf, *others in zip(labels, leaves, *rest_leaves)]
    return jax.tree.unflatten(treedef, out)


def _as_param_tree(params_or_model, wrt):
    """A plain parameter pytree; Flax NNX modules become ``nnx.as_pure(nnx.state(...))``."""
    try:
        from flax import nnx  # pylint: disable=g-import-not-at-top
    except ImportError:  # pragma: no cover - flax is a dependency
        return params_or_model
    if isinstance(params_or_model, nnx.Module):
        return nnx.as_pure(nnx.state(params_or_model, nnx.Param if wrt is None else wrt))
    return params_or_model


def _check_not_a_schedule_count(tree) -> None:
    """A bare integer scalar where params belong: ``inject_hyperparams`` called the labels."""
    if (
        isinstance(tree, jax.Array)
        and tree.ndim == 0
        and jax.numpy.issubdtype(tree.dtype, jax.numpy.integer)
    ):
        raise TypeError(
            "label_params: params is an integer scalar, not a parameter tree. Under "
            "optax.inject_hyperparams a callable param_labels is taken for a schedule and "
            "called with the step count; list it in static_args, e.g. "
            'optax.inject_hyperparams(bj.cggm, static_args=("param_labels",)).'
        )


def _dotted_rule_hint(rules, unused) -> str:
    """How to write a rule for a key containing '.', when such a rule matched nothing."""
    dotted = [r for r in rules if isinstance(r, str) and "." in r and _split_rule(r) in unused]
    if not dotted:
        return ""
    return (
        f" A '.' in a rule separates keys like '/', so {dotted[0]!r} is read as "
        f"{_split_rule(dotted[0])}; for a key that itself contains '.', give the rule as a "
        f"tuple of keys, e.g. {(dotted[0],)!r}."
    )


def _split_rule(rule) -> tuple[str, ...]:
    if isinstance(rule, str):
        return tuple(k for k in rule.replace(".", "/").split("/") if k)
    return tuple(str(k) for k in rule)


def label_params(
    params: PyTree, rules: Mapping[Any, Any], *, default: Any = _RAISE, wrt: Any = None
) -> PyTree:
    """Label every parameter with its modality from path-prefix rules.

    Each rule maps a path prefix to a label. A parameter's path is its sequence of keys
    (``"encoders/0/kernel"`` for ``params["encoders"][0]["kernel"]``, or for the NNX module
    attribute ``model.encoders[0].kernel``); the longest matching prefix decides its label:

    - an ``int`` ``i``: modality ``i``;
    - ``None``: shared (the transforms leave it alone);
    - ``bogc_jax.labels.INDEX`` (the string ``"index"``): the integer key right after the
      prefix, so ``{"encoders": INDEX}`` gives every parameter under ``encoders[i]`` the
      label ``i``.

    Args:
      params: a parameter pytree, or a Flax NNX module (its ``nnx.Param`` state, or the
        ``wrt`` filter's, is labelled).
      rules: mapping from path prefix (``"encoders/0"``, ``"encoders.0"`` or a tuple of
        keys) to ``int``, ``None`` or ``INDEX``.
      default: label for parameters that no rule matches. Left out, such parameters are an
        error that names them, so that no parameter is silently treated as shared.
      wrt: the NNX variable filter when ``params`` is a module (default ``nnx.Param``).

    Returns:
      A pytree shaped like the (bare) parameters with an ``int`` or ``None`` at each leaf,
      ready for ``param_labels=``.

    Raises:
      ValueError: when a parameter matches no rule (and no ``default``), when a rule
        matches no parameter, or when an ``INDEX`` rule is not followed by an integer key.

    Example:
      >>> import jax.numpy as jnp, bogc_jax as bj
      >>> params = {"encoders": [{"w": jnp.ones(2)}, {"w": jnp.ones(3)}],
      ...           "head": {"w": jnp.ones(5)}}
      >>> bj.label_params(params, {"encoders": bj.labels.INDEX, "head": None})
      {'encoders': [{'w': 0}, {'w': 1}], 'head': {'w': None}}
    """
    tree = _as_param_tree(params, wrt)
    _check_not_a_schedule_count(tree)
    parsed: dict[tuple[str, ...], Any] = {}
    spelled: dict[tuple[str, ...], Any] = {}
    for rule, label in rules.items():
        prefix = _split_rule(rule)
        if not (isinstance(label, str) and label == INDEX):
            label = _check_label(label, f"[{rule!r}]", "rules")
        if prefix in parsed and parsed[prefix] != label:
            raise ValueError(
                f"label_params: rules {spelled[prefix]!r} and {rule!r} name the same path "
                f"{'/'.join(prefix)!r} with different labels ({parsed[prefix]!r} and "
                f"{label!r}); which one applies would depend on their order. Keep one rule "
                "per path."
            )
        parsed[prefix] = label
        spelled[prefix] = rule
    used = set()
    unlabelled = []

    def label_leaf(path, leaf):
        del leaf
        keys = tuple(_key_str(k) for k in path)
        best = None
        for prefix in parsed:
            if keys[: len(prefix)] == prefix and (best is None or len(prefix) > len(best)):
                best = prefix
        if best is None:
            if default is _RAISE:
                unlabelled.append(_path_str(path))
                return None
            return _check_label(default, " (default)", "label_params")
        used.add(best)
        label = parsed[best]
        if label == INDEX:
            if len(keys) <= len(best) or not keys[len(best)].isdigit():
                raise ValueError(
                    f"rules[{'/'.join(best)!r}] is INDEX, so the key after it must be an integer "
                    f"(like encoders/0/...); parameter {_path_str(path)} has "
                    f"{keys[len(best)] if len(keys) > len(best) else 'nothing'} there. Give that "
                    "subtree an explicit int label instead."
                )
            return int(keys[len(best)])
        return label

    labels = jax.tree_util.tree_map_with_path(label_leaf, tree)
    unused = [p for p in parsed if p not in used]
    hint = _dotted_rule_hint(rules, unused)
    if unlabelled:
        shown = ", ".join(unlabelled[:10]) + (" ..." if len(unlabelled) > 10 else "")
        raise ValueError(
            f"label_params: {len(unlabelled)} parameter(s) match no rule: {shown}. Add a rule "
            "for them (an int for a modality's encoder, None for shared parameters such as "
            "{'head': None}), or pass default=None to treat every unmatched parameter as "
            f"shared.{hint}"
        )
    if unused:
        top = sorted(
            {_key_str(path[0]) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0] if path}
        )
        raise ValueError(
            f"label_params: rule(s) {[('/'.join(p) or '<root>') for p in unused]} match no "
            f"parameter; the parameters' top-level keys are {top}. Check the spelling of the "
            f"prefix.{hint}"
        )
    return labels
