"""Swap a torchvision ResNet-50's classifier for a hierarchical softmax head.

:func:`hsoftmax.replace_classifier` finds the model's final ``nn.Linear`` (``model.fc`` for a
ResNet) and replaces it with :class:`hsoftmax.HierarchicalSoftmax`. The network is then trained
as usual with :class:`hsoftmax.HierarchicalCrossEntropy`; here a few steps on random images
(``weights=None``: random initialisation, nothing is downloaded), then ``predict``, ``topk`` and
``log_probs`` on the backbone's features.

Run::

    pip install torchvision
    python examples/swap_resnet.py            # 80,000 classes (1000 x 80), 3 steps at 224 px
    python examples/swap_resnet.py --quick    # 64 px images, 2 steps

Exit status 2, with a message saying what to install, when torchvision cannot be imported.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import ModuleType

import torch
from torch import nn

import hsoftmax

EXIT_NO_TORCHVISION = 2


def import_torchvision() -> ModuleType | None:
    """Import torchvision, or print why it cannot be used and return ``None``."""
    try:
        import torchvision
    except Exception as error:  # ImportError, or a torchvision built for another torch
        print(
            "examples/swap_resnet.py needs torchvision, which cannot be imported here "
            f"({type(error).__name__}: {error}).\n"
            "Install the torchvision release that matches your torch "
            f"({torch.__version__}): pip install torchvision",
            file=sys.stderr,
        )
        return None
    return torchvision


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The ResNet's pooled features, the input of its classifier (``model.fc``)."""
    body = nn.Sequential(*(m for name, m in model.named_children() if name != "fc"))
    return torch.flatten(body(images), 1)


def main(argv: list[str] | None = None) -> int:
    """Build, swap, train a few steps and predict.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, or 2 when torchvision is missing.
    """
    parser = argparse.ArgumentParser(description="ResNet-50 with a hierarchical softmax head.")
    parser.add_argument("--quick", action="store_true", help="small images and 2 steps")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    torchvision = import_torchvision()
    if torchvision is None:
        return EXIT_NO_TORCHVISION
    size, steps = (64, 2) if args.quick else (224, args.steps)
    torch.manual_seed(0)

    model = torchvision.models.resnet50(weights=None)  # random weights: no download
    flat_params = hsoftmax.count_parameters(model.fc)
    # The head takes the old classifier's class count (ImageNet's 1,000 here) unless
    # num_classes= says otherwise; model.fc's input (2048 features) is kept either way.
    head = hsoftmax.replace_classifier(
        model, n_top=1000, n_bottom=80, hidden=128, num_classes=80_000
    )
    print(f"replaced model.fc ({flat_params:,} parameters) by {head}")
    print(f"head parameters: {hsoftmax.count_parameters(head):,} for {head.num_classes:,} "
          f"classes (a flat Linear(2048, {head.num_classes}) would have "
          f"{hsoftmax.flat_head_parameters(2048, head.num_classes):,})")

    criterion = hsoftmax.HierarchicalCrossEntropy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(1, steps + 1):
        images = torch.randn(args.batch, 3, size, size)
        labels = torch.randint(0, head.num_classes, (args.batch,))
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels)  # model(images) is a HierarchicalOutput
        loss.backward()
        optimizer.step()
        print(f"step {step}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.2f}s)")

    model.eval()
    with torch.no_grad():
        x = features(model, torch.randn(2, 3, size, size))
        _, classes = head.topk(x, k=5)
        routed = head.predict(x)
        log_probs = head.log_probs(x)
    print(f"exact top-5 classes: {classes.tolist()}")
    print(f"top-1 routing: {routed.tolist()}; log_probs shape {tuple(log_probs.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
