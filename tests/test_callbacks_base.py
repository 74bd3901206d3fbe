"""callbacks.base.EvaluationCallback, what the evaluation callbacks share: the every-n-epochs rule,
held-out samples fixed by the first validation after the sanity check, and samples generated per
rank under a forked, seeded random state."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.base import EvaluationCallback
from helpers import TrivialModule

pytestmark = pytest.mark.usefixtures("one_thread")


class Recording(EvaluationCallback):
    """Records the epochs it evaluated at and the held-out samples it saw then; keeps up to
    `capacity` held-out samples."""

    def __init__(self, every_n_epochs: int = 1, seed: int = 0, capacity: int = 0) -> None:
        super().__init__(every_n_epochs, seed)
        self.capacity = capacity
        self.evaluated: list[int] = []
        self.seen: list[torch.Tensor | None] = []

    def held_out_capacity(self, x, trainer):
        return self.capacity

    def evaluate(self, trainer, pl_module):
        self.evaluated.append(trainer.current_epoch)
        self.seen.append(self.held_out)


class Sampler(TrivialModule):
    """sample(n): n draws of N(0, I_3) from the global stream, recording each call's n and the
    module's train/grad flags; remembers the validation batches of each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, bool, bool]] = []
        self.val_batches: dict[int, list[torch.Tensor]] = {}

    def sample(self, num_samples):
        self.calls.append((num_samples, self.training, torch.is_grad_enabled()))
        return torch.randn(num_samples, 3)

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            self.val_batches.setdefault(self.current_epoch, []).append(batch.clone())


@pytest.mark.parametrize("n", [1, 3])
def test_due_at_epochs_n_minus_one_2n_minus_one_and_never_in_the_sanity_check(n):
    callback = Recording(every_n_epochs=n)
    due = [epoch for epoch in range(10) if callback.due(SimpleNamespace(sanity_checking=False, current_epoch=epoch))]
    assert due == list(range(n - 1, 10, n))
    assert not any(callback.due(SimpleNamespace(sanity_checking=True, current_epoch=e)) for e in range(10))


def test_every_n_epochs_and_held_out_samples_in_a_fit(quiet_trainer):
    """every_n_epochs=2 over 5 epochs with a sanity check: evaluated at epochs 1 and 3. The held-out
    samples are the first 6 of the first validation after the sanity check (epoch 0, which is not
    due), from a shuffling loader that gives other batches every epoch, and stay so for the run."""
    callback = Recording(every_n_epochs=2, capacity=6)
    model = Sampler()
    torch.manual_seed(0)
    data = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    trainer = quiet_trainer(max_epochs=5, limit_train_batches=1, num_sanity_val_steps=2, callbacks=[callback])
    trainer.fit(model, DataLoader(torch.zeros(2, 2)), DataLoader(data, batch_size=4, shuffle=True))
    assert callback.evaluated == [1, 3]
    first = torch.cat(model.val_batches[0])[:6]
    assert not torch.equal(first, torch.cat(model.val_batches[1])[:6])  # the loader shuffles
    assert all(torch.equal(seen, first) for seen in callback.seen) and torch.equal(callback.held_out, first)
    assert callback.held_out.device.type == "cpu"


@pytest.mark.parametrize("rank", [0, 1])
def test_generate_is_seeded_per_rank_in_eval_mode_and_leaves_the_global_stream(rank):
    """count 7 in calls of at most 3: the draws of a generator seeded with seed + rank, in eval mode
    without gradients; the same twice; other samples on another rank; the global random state and
    the module's mode as they were."""
    callback = Recording(seed=11)
    model = Sampler()
    trainer = SimpleNamespace(global_rank=rank)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = callback.generate(trainer, model, 7, batch_size=3)
    assert torch.equal(torch.get_rng_state(), state)
    second = callback.generate(trainer, model, 7, batch_size=3)
    assert torch.equal(first, second)
    expected = torch.Generator().manual_seed(11 + rank)
    torch.testing.assert_close(first, torch.cat([torch.randn(n, 3, generator=expected) for n in (3, 3, 1)]), rtol=0, atol=0)
    assert model.calls == [(3, False, False), (3, False, False), (1, False, False)] * 2
    assert model.training
    other = callback.generate(SimpleNamespace(global_rank=1 - rank), model, 7, batch_size=3)
    assert not torch.equal(other, first)
