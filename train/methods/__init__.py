"""Training methods: one record each (Method, train/methods/record.py), registered here by name.

    vanilla         cross-entropy on clean images
    adv_train       Madry et al. 2018: cross-entropy on PGD examples only; one norm set
    goodfellow_mix  Goodfellow et al. 2015: α·J(x) + (1 − α)·J(x_adv); one norm set that sees clean and
                    adversarial images in one batch (the AdvProp paper's "adversarial training")
    advprop         Xie et al. 2020: J(x; main norms) + w·J(x_adv; aux norms), the attack through aux norms
    fast_advprop    Mei et al. 2022: 4:1 clean:adv split of the batch, every attack iteration's forward
                    and backward also train the weights (aux norms), loss weights 1 / ½ / ½
    pyramid_at      Herrmann et al. 2022: J(x) + w·J(x_adv), one norm set, the same dropout masks for
                    every pass of a step (with attack=pyramid: Pyramid Adversarial Training)

Every method that attacks takes any training attack kind (cfg.attack, train/attacks/):
`method=advprop attack=pyramid` is PyramidAT's attack with AdvProp's auxiliary norms.

A new method is one file here: its step generator, its options dataclass and their checks, and a
`METHOD = Method(...)` record naming them (dual norms, backwards per step, attack defaults, its
tools/bench_step.py cases); list its module in BUILT_IN (or call register(record) from your own
code before load_config). The config's `method=NAME` then selects it, `NAME.<option>=…` sets its
options, and validation, the model's norms, DDP and the benchmark follow from the record.

Loss scale of the dual-norm methods (advprop, fast_advprop), as the Fast AdvProp authors' code
(meijieru/fast_advprop, imagenet.py train(), fast_advprop.py use_param_sets: "synchronizing
parameter updating speed") computes it: per-sample losses are summed with their weights, and each
parameter's gradient is divided by the weighted number of images that reached it:

    shared weights  Σ_i w_i·ℓ_i / Σ_i w_i           (every image counts once: vanilla's scale)
    main norms      mean over the clean images      (their only images)
    aux norms       Σ_adv w_i·ℓ_i / Σ_adv w_i       (the attacked and adversarial images)

For advprop (w = 1 for clean, advprop.adv_weight = w for adversarial images) the shared weights get
the paper's objective J(x) + w·J(x_adv) divided by 1 + w, which at Xie's w = 1 is exactly what both
public codes give them (Xie's and tingxueronghua's concatenated 2B batch averaged once; Mei's
AdvProp baseline). The norms' gradients are Mei's per-group means; the concatenated batch gives
the main norms (1 + w)× less (J(x)/(1 + w)) and the aux norms (1 + w)/w× less — both 2× at w = 1.
The recipes' learning rates are those of vanilla training. For fast_advprop (B images, 4:1 split,
weights 1 / ½ / ½, one attack step) the shared weights see ≈ 0.8·mean(clean) + 0.1·mean(attack) +
0.1·mean(adv); with k attack steps each iteration adds its ½·mean(attack) share (fast_advprop.py).

Cost in units of one vanilla step (forward + backward of B images = 1): a PGD step with frozen
weights costs s (tools/bench_step.py measures it), so advprop and pyramid_at with k steps ≈ 2 + s·k,
adv_train ≈ 1 + s·k;
fast_advprop trains on (1 − f)·B clean rows, then k attack iterations and one adversarial pass of
f·B rows (f = adv_fraction), each a training forward and backward: ≈ 1 + f·k.
"""
from __future__ import annotations

from common.registry import add_record
from train.methods import adv_train, advprop, fast_advprop, goodfellow_mix, pyramid_at, vanilla
from train.methods.common import make_adversarial
from train.methods.record import Backward, Method, MethodSteps, StepContext, StepOutput

BUILT_IN = (vanilla, adv_train, goodfellow_mix, advprop, fast_advprop, pyramid_at)
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make a method selectable by `method=<name>` (a name already taken is an error)."""
    return add_record(METHODS, method, "a method")


def method_of(cfg) -> Method:
    return METHODS[cfg.method]


for module in BUILT_IN:
    register(module.METHOD)

__all__ = ["BUILT_IN", "METHODS", "Backward", "Method", "MethodSteps", "StepContext", "StepOutput",
           "make_adversarial", "method_of", "register"]
