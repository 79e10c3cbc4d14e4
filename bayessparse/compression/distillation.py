"""Knowledge distillation: a student trained on a teacher's softened predictions.

The loss mixes the cross-entropy of the student's and teacher's distributions at
temperature ``T`` with the ordinary cross-entropy on the labels,

    L = α · T² · KL(softmax(t / T) ‖ softmax(s / T)) + (1 − α) · CE(s, y),

averaged over the batch. The soft term's gradient in a student logit is
``T · (q_i − p_i)`` (q the student's, p the teacher's softened probabilities), whose
size is of order ``1/T`` before the ``T²`` factor: the factor keeps the two terms'
relative weight when ``T`` changes. As ``T → ∞`` with zero-mean logits over ``N``
classes it tends to ``(s_i − t_i) / N``: matching logits (Hinton et al. 2015, §2.1).
The KL differs from the paper's soft cross-entropy by the teacher's entropy, a constant.

References:
    Hinton, Vinyals, Dean. Distilling the knowledge in a neural network. NIPS 2014
    Deep Learning Workshop, arXiv:1503.02531 (2015).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
) -> Tensor:
    """``α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, y)``, batch mean.

    The teacher's logits are detached: the caller trains the student with this loss.

    Args:
        student_logits: ``(batch, classes)``.
        teacher_logits: ``(batch, classes)``.
        labels: ``(batch,)`` class indices.
        temperature: ``T > 0`` (the paper uses 1 to 20).
        alpha: the soft term's weight, in [0, 1].

    Returns:
        The scalar loss.

    Raises:
        ValueError: ``T`` not positive and finite, ``alpha`` outside [0, 1], or logits of
            different shapes.
    """
    if not (0 < temperature < math.inf):
        raise ValueError(f"Expected a finite temperature > 0, got {temperature!r}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"Expected alpha in [0, 1], got {alpha!r}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Expected student and teacher logits of one shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}."
        )
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1 - alpha) * hard
