"""What a recipe or an override may interpolate: other keys of the config, nothing else.

`${data.image_size}`, `${.eps}` (ATTACK_PRESETS' fgsm) and `run-${model}` refer to the config's
own keys and resolve to values it already holds. A resolver call, `${oc.env:WANDB_API_KEY}`,
`${oc.decode:…}` or any `${name:…}`, is refused in one line naming the key: a recipe is shared and
downloaded, and whatever a resolver reads (the environment: a secret) would be copied into
config.yaml, every checkpoint and the W&B run. Every interpolation is resolved once here, so a
dangling or circular one is the same kind of line, not a traceback later.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, grammar_parser
from omegaconf.errors import GrammarParseError, OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser

from common.errors import UserInputError

RULE = ("a recipe or an override may refer to other keys (${data.image_size}) but call no resolver: what it reads, "
        "the environment's secrets too, would be written into config.yaml and the W&B run")


class InterpolationRefused(UserInputError):
    """A resolver call, or an interpolation that does not resolve, in a recipe or an override."""


def leaves(node, prefix: str = "") -> dict[str, object]:
    """{"attack.eps": value, …} for a container of dicts and lists (unresolved)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return {prefix: node}
    flat = {}
    for key, value in items:
        flat.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def resolvers_called(text: str) -> list[str]:
    """The resolver names a string calls (nested ones too), by OmegaConf's own grammar."""
    if "${" not in text:
        return []
    names, todo = [], [grammar_parser.parse(text)]
    while todo:
        node = todo.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            names.append(node.resolverName().getText())
        todo += [node.getChild(i) for i in range(node.getChildCount() if hasattr(node, "getChildCount") else 0)]
    return names


def refuse_resolvers(node, where: str) -> None:
    """InterpolationRefused naming the first key of `node` (a DictConfig or a container, before it
    is resolved) whose value calls a resolver or is not a valid interpolation."""
    container = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    for key, value in leaves(container).items():
        if not isinstance(value, str):
            continue
        try:
            called = resolvers_called(value)
        except GrammarParseError as error:
            raise InterpolationRefused(f"{where}: {key}: {value!r} is not a valid interpolation "
                                       f"({str(error).splitlines()[0]})") from None
        if called:
            raise InterpolationRefused(f"{where}: {key}: {value!r} calls the resolver {called[-1]}, refused: {RULE}")


def resolve_or_refuse(cfg: DictConfig, where: str) -> None:
    """Resolve every interpolation of cfg once (they stay interpolations): one that does not
    resolve (a missing key, a loop, a value of the wrong type), or that resolves to text holding
    `${` (config.yaml would read it as an interpolation), is InterpolationRefused naming the key."""
    raw = leaves(OmegaConf.to_container(cfg, resolve=False))
    try:
        resolved = leaves(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        problem = (getattr(error, "msg", None) or str(error)).splitlines()[0]
        raise InterpolationRefused(f"{where}: {key}: {raw.get(key)!r} does not resolve: {problem}") from None
    for key, value in resolved.items():
        if isinstance(value, str) and "${" in value:
            raise InterpolationRefused(f"{where}: {key}: {value!r} holds '${{' once resolved (an escaped "
                                       f"interpolation): a saved config would read it as one; {RULE}")
