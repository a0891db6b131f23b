"""Forward-Forward (Hinton, "The Forward-Forward Algorithm: Some Preliminary Investigations", arXiv 2212.13345,
2022).

No backward pass and no output error: every hidden layer learns on its own to give high "goodness" to positive
data (an input with its true label embedded) and low goodness to negative data (the same input with a wrong
label). With hidden blocks h_l = f_l(W_l u_{l-1} + b_l), batch size B, C classes:

    embedding:      u_0 = x (flattened) with its first C features replaced by label_scale * onehot(label)
    positive:       label = y;   negative: label = a random wrong label, uniform over the C - 1 others
    layer input:    u_l = h_l / |h_l|  (input_norm="unit"),  or h_l / |h_l| * sqrt(|h_l|) (="rms", mean square 1);
                    detached, so only the direction of h_l reaches layer l+1 and no gradient crosses a layer
    goodness:       g_l = mean_j h_lj^2  (goodness="mean")   or  sum_j h_lj^2  (goodness="sum", the paper's)
    layer loss:     L_l = mean_batch[ softplus(-(g_l^pos - theta)) + softplus(g_l^neg - theta) ]
                    (= -log sigma(g^pos - theta) - log(1 - sigma(g^neg - theta)), the paper's logistic)
    prediction:     score(c) = sum over hidden layers of g_l with label c embedded;  predict argmax_c

Choices (measured here only on tiny runs: 784-64-32 and 784-512-128 ReLU nets, 2000 MNIST images, SGD lr 0.01):
the paper's sum goodness needs a threshold proportional to the layer width (with theta = 2 and sum the loss
starts near 30 and accuracy stayed at chance), so the default is the mean, whose scale does not depend on the
width; label_scale 3 (about the largest standardised MNIST pixel, as the paper's one-hot equals the largest raw
pixel, 1) learned clearly better than 1. The first layer sees the embedded input as it is (normalize_input=True
normalises it like the others). FF usually wants more epochs and a tuned optimizer than the other rules.

All hidden layers learn at once, each from its own loss. The model's output block is not used by FF: its
parameters get zero gradients. Positive and negative data go through each layer as one batch [positive;
negative]. StepOutput.loss is the FF loss summed over layers. StepOutput.logits costs nothing extra with
logits="pair": the summed goodness of the positive pass in the true label's column and that of the negative pass
in every other column, so argmax equals y exactly when the positive beat the negative (a pairwise training
accuracy, not a classification); logits="predict" runs `predict` (C more forward passes) for a real training
accuracy. The wrong labels come from a generator the rule owns; its state is in state_dict.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..models import Net, as_net
from ._common import PeerRule, RuleRNG, begin_step, fill_missing_grads, local_backward, out_features
from .base import StepOutput

GOODNESS = ("sum", "mean")
NORMS = ("unit", "rms")
LOGITS = ("pair", "predict")


@dataclass
class FF(PeerRule):
    """Forward-Forward; options: goodness, threshold, label embedding scale, what the step reports as logits."""

    name = "ff"
    theta: float = 2.0             # goodness threshold
    goodness: str = "mean"         # "mean" of squared activities (width-independent) or their "sum" (the paper)
    label_scale: float = 3.0       # value of the embedded one-hot label (~ the largest standardised MNIST pixel)
    input_norm: str = "unit"       # next layer's input: "unit" h / |h|; "rms" h / |h| * sqrt(|h|) (mean square 1)
    normalize_input: bool = False  # normalise the embedded input of the first layer too
    logits: str = "pair"           # StepOutput.logits: "pair" (free) or "predict" (C extra forward passes)
    seed: int = 0                  # seeds the negative labels
    rng: RuleRNG = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_options(choices={"goodness": GOODNESS, "logits": LOGITS, "input_norm": NORMS},
                           finite=("theta", "label_scale"))
        self.rng = RuleRNG(self.seed, offset=2)

    def embed(self, model: Net, x: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
        """The flattened input with its first C features replaced by label_scale * onehot(labels)."""
        u = model.prepare(x).flatten(1)
        if u.shape[1] < n_classes:
            raise ValueError(f"ff: the input has {u.shape[1]} features, fewer than the {n_classes} labels to embed")
        n_in = getattr(model.blocks[0].layer, "in_features", u.shape[1])
        if n_in != u.shape[1]:  # e.g. a Linear applied per position of a (B, P, F) input, flattened only later
            raise ValueError(f"ff: the label is embedded in the whole flattened sample ({u.shape[1]} features of an "
                             f"input of shape {tuple(x.shape[1:])}), but the first Linear takes {n_in}: FF needs an "
                             f"MLP whose first layer reads the flattened sample (hidden blocks output (batch, "
                             f"features))")
        u = u.clone()
        u[:, :n_classes] = F.one_hot(labels, n_classes).to(u.dtype) * self.label_scale
        return u

    def _goodness(self, h: torch.Tensor) -> torch.Tensor:
        sq = h.flatten(1).pow(2)
        return sq.sum(1) if self.goodness == "sum" else sq.mean(1)

    def _layers(self, model: Net, u: torch.Tensor):
        """Yields each hidden block's output with its local graph; a block's input is the previous output, detached
        and normalised (the first block's is the embedded input, normalised only with normalize_input)."""
        h = u
        for l, block in enumerate(model.blocks[:-1]):
            h = h.detach()  # every block's input is detached: its loss reaches only its own parameters
            if l > 0 or self.normalize_input:
                norm = h.flatten(1).norm(dim=1).clamp_min(1e-12)
                if self.input_norm == "rms":
                    norm = norm / h[0].numel() ** 0.5
                h = h / norm.view(-1, *[1] * (h.dim() - 1))
            h = block(h)
            yield h

    def negative_labels(self, y: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Uniform over the wrong labels: y + k mod C with k uniform in 1 .. C-1, never y itself."""
        shift = self.rng.draw(torch.randint, y.shape, 1, n_classes, device=y.device)
        return (y + shift) % n_classes

    def step(self, model: Net, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        model = begin_step(model, x, y, "ff", mlp_only=True)
        n_classes = out_features(model)
        if n_classes < 2:
            raise ValueError("ff needs at least 2 classes to draw wrong labels")
        batch = x.shape[0]
        y_neg = self.negative_labels(y, n_classes)
        u = torch.cat([self.embed(model, x, y, n_classes), self.embed(model, x, y_neg, n_classes)])
        losses, score = [], torch.zeros(2 * batch, dtype=u.dtype, device=u.device)
        for h in self._layers(model, u):
            g = self._goodness(h)
            g_pos, g_neg = g[:batch], g[batch:]
            losses.append(F.softplus(self.theta - g_pos).mean() + F.softplus(g_neg - self.theta).mean())
            score += g.detach()
        total = torch.stack(losses).sum()
        local_backward([total], [None])
        fill_missing_grads(model)  # the output block is not trained by FF

        if self.logits == "predict":
            logits = self.predict(model, x)
        else:
            s_pos, s_neg = score[:batch], score[batch:]
            logits = s_neg.unsqueeze(1).expand(batch, n_classes).clone()
            logits.scatter_(1, y.unsqueeze(1), s_pos.unsqueeze(1))
        return StepOutput(total.detach(), logits)

    @torch.no_grad()
    def predict(self, model: Net, x: torch.Tensor) -> torch.Tensor:
        """(B, C): for each candidate label, the goodness summed over the hidden layers with that label embedded."""
        model = as_net(model)
        n_classes = out_features(model)
        scores = []
        for c in range(n_classes):
            labels = torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)
            u = self.embed(model, x, labels, n_classes)
            scores.append(sum(self._goodness(h) for h in self._layers(model, u)))
        return torch.stack(scores, dim=1)

    def state_dict(self) -> dict[str, Any]:
        rng = self.rng.state_dict()
        return {"rng": rng} if rng else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_keys(state, ("rng",))
        self.rng.load_state_dict(state.get("rng"))
