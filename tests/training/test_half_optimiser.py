"""``--trainer.precision 16-true``: AdamW is refused before training, SGD trains, and a non-finite
loss of float16 weights points at the precision.

AdamW's eps (1e-8) is 0 in float16: its first step with a zero gradient wrote NaN into the weights,
and the second step failed with a non-finite loss whose advice (lower the learning rate, clip the
gradients) could not help.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_rpn.core.loss import NonFiniteLossError
from lightning_rpn.training.optim import check_optimizer_dtype

from helpers.model import collate_for, quiet_trainer, synthetic_samples, tiny_model, training_batches


def test_adamw_with_16_true_is_refused_before_the_first_step(tmp_path) -> None:
    model = tiny_model(optimizer="adamw", lr=1e-3, warmup_steps=0)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, precision="16-true")
    with pytest.raises(ValueError, match=r"model.optimizer='adamw' cannot update float16 parameters \(trainer.precision "
                                         r"'16-true'.*eps=1e-8 is 0 in float16.*bf16-mixed.*--model.optimizer sgd"):
        trainer.fit(model, DataLoader(training_batches(model), batch_size=None))
    assert trainer.global_step == 0


def test_the_check_reads_the_parameters_dtype() -> None:
    half = [{"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))]}]
    with pytest.raises(ValueError, match="cannot update float16 parameters"):
        check_optimizer_dtype("adamw", half)
    check_optimizer_dtype("sgd", half)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        check_optimizer_dtype("adamw", [{"params": [torch.nn.Parameter(torch.zeros(2, dtype=dtype))]}])


def test_sgd_trains_with_16_true(tmp_path) -> None:
    model = tiny_model(optimizer="sgd", lr=0.02, warmup_steps=0)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, precision="16-true")
    trainer.fit(model, DataLoader(training_batches(model), batch_size=None))
    assert trainer.global_step == 3
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_loss_of_float16_weights_names_the_precision(tmp_path) -> None:
    model = tiny_model(optimizer="sgd", lr=0.02, warmup_steps=0)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, precision="16-true")
    with pytest.raises(NonFiniteLossError, match=r"the parameters are float16 \(trainer.precision '16-true'\).*"
                                                 r"--trainer.precision 16-mixed, bf16-mixed or bf16-true; lower model.lr"):
        trainer.fit(model, DataLoader(training_batches(model, bad_index=1), batch_size=None))
    # a model cast with .half() outside a Trainer; a float32 one gets the usual advice only
    batch = collate_for(model)(synthetic_samples(2))
    batch.positive_deltas.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"float16 \(a model cast with .half\(\)\)"):
        tiny_model().half().validation_step(batch, 0)
    with pytest.raises(NonFiniteLossError) as error:
        tiny_model().validation_step(batch, 0)
    assert "float16" not in str(error.value) and "lower model.lr" in str(error.value)
