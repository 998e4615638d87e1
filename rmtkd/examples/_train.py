"""Training and scoring shared by the built-in classifier examples."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


# Share of each example's training split held out as the validation split: it decides the
# compression's epsilon roll-backs, so the reported test split stays untouched.
VAL_FRACTION = 0.1


def three_way_split(X: Any, y: Any, *, seed: int, test_fraction: float,
                    val_fraction: float = VAL_FRACTION) -> tuple[Any, ...]:
    """Stratified, seeded ``(Xtr, ytr, Xval, yval, Xte, yte)`` NumPy arrays: the test split
    is ``test_fraction`` of the data, the validation split ``val_fraction`` of the rest."""
    from sklearn.model_selection import train_test_split

    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_fraction, random_state=seed,
                                          stratify=y)
    Xtr, Xval, ytr, yval = train_test_split(Xtr, ytr, test_size=val_fraction,
                                            random_state=seed, stratify=ytr)
    return Xtr, ytr, Xval, yval, Xte, yte


def standardised_tensors(parts: tuple[Any, ...], mean: Any, std: Any
                         ) -> tuple[torch.Tensor, ...]:
    """``(X, y, X, y, ...)`` NumPy arrays -> float32 ``(X - mean) / std`` and int64 labels."""
    return tuple(torch.as_tensor((a - mean) / std, dtype=torch.float32) if i % 2 == 0
                 else torch.as_tensor(a, dtype=torch.int64) for i, a in enumerate(parts))


def labelled_batches(X: torch.Tensor, y: torch.Tensor, batch_size: int
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(X[i:i+b], y[i:i+b]), ...]`` in order."""
    return list(zip(X.split(batch_size), y.split(batch_size)))


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 500
             ) -> float:
    """Fraction of rows of ``X`` (``[n, ...]``) whose argmax logit equals ``y`` (``[n]``),
    in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = sum((model(xb).argmax(dim=1) == yb).sum().item()
                  for xb, yb in zip(X.split(batch_size), y.split(batch_size)))
    model.train(was_training)
    return correct / max(len(X), 1)


def train_classifier(model: nn.Module, data: tuple[torch.Tensor, ...], *, seed: int,
                     epochs: int, batch_size: int, lr: float, threads: int,
                     cosine: bool = False, desc: str = "train", progress: bool = True
                     ) -> dict[str, Any]:
    """Adam on cross-entropy over shuffled minibatches; deterministic given ``seed``.

    data: ``(Xtr, ytr, Xte, yte)``. threads: intra-op threads while training (small models
    train fastest on few; the caller's setting is restored). cosine: cosine-decay the
    learning rate over all steps. Returns the metrics ``train_accuracy``,
    ``test_accuracy``, ``final_loss``, ``epochs``, ``seed``, ``n_train``, ``n_test``,
    ``seconds``; the model is left in eval mode.
    """
    Xtr, ytr, Xte, yte = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(Xtr) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1)) if cosine else None
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    previous = torch.get_num_threads()
    torch.set_num_threads(min(threads, previous))
    t0 = time.perf_counter()
    try:
        model.train()
        for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress):
            for idx in torch.randperm(len(Xtr), generator=gen).split(batch_size):
                loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
        model.eval()
        return {"train_accuracy": accuracy(model, Xtr, ytr),
                "test_accuracy": accuracy(model, Xte, yte), "final_loss": loss.item(),
                "epochs": epochs, "seed": seed, "n_train": len(Xtr), "n_test": len(Xte),
                "seconds": round(time.perf_counter() - t0, 2)}
    finally:
        torch.set_num_threads(previous)
