"""Write ``docs/_inv/torch.inv`` and ``python.inv``: small, offline Sphinx inventories of the
PyTorch and Python names the docs refer to, with their real URLs on pytorch.org and
docs.python.org.

The docs are built without network access, so intersphinx cannot download PyTorch's own
inventory. This script lists the entries the docs and docstrings use; ``docs/conf.py`` runs it
at every build (the output is deterministic, and committed). Add a line to ``ENTRIES`` when a
page refers to a new PyTorch name.

Run: ``python docs/_inv/make_torch_inv.py``
"""

from __future__ import annotations

import zlib
from pathlib import Path

#: (name, domain:role, page relative to https://pytorch.org/docs/stable/, anchor).
#: An anchor of ``"$"`` means the name itself.
ENTRIES: list[tuple[str, str, str, str]] = [
    ("torch", "py:module", "torch.html", "module-torch"),
    ("torch.Tensor", "py:class", "tensors.html", "$"),
    ("torch.dtype", "py:class", "tensor_attributes.html", "$"),
    ("torch.device", "py:class", "tensor_attributes.html", "$"),
    ("torch.topk", "py:function", "generated/torch.topk.html", "$"),
    ("torch.argmax", "py:function", "generated/torch.argmax.html", "$"),
    ("torch.compile", "py:function", "generated/torch.compile.html", "$"),
    ("torch.autocast", "py:class", "amp.html", "$"),
    ("torch.export", "py:module", "export.html", "module-torch.export"),
    ("torch.export.export", "py:function", "export.html", "$"),
    ("torch.distributed", "py:module", "distributed.html", "module-torch.distributed"),
    ("torch.nn.Module", "py:class", "generated/torch.nn.Module.html", "$"),
    # how autodoc spells nn.Module in signatures (resolved, or as written in the annotation)
    ("nn.Module", "py:class", "generated/torch.nn.Module.html", "torch.nn.Module"),
    (
        "torch.nn.modules.module.Module",
        "py:class",
        "generated/torch.nn.Module.html",
        "torch.nn.Module",
    ),
    ("torch.nn.Linear", "py:class", "generated/torch.nn.Linear.html", "$"),
    ("torch.nn.CrossEntropyLoss", "py:class", "generated/torch.nn.CrossEntropyLoss.html", "$"),
    (
        "torch.nn.AdaptiveLogSoftmaxWithLoss",
        "py:class",
        "generated/torch.nn.AdaptiveLogSoftmaxWithLoss.html",
        "$",
    ),
    (
        "torch.nn.parameter.Parameter",
        "py:class",
        "generated/torch.nn.parameter.Parameter.html",
        "$",
    ),
    (
        "torch.nn.functional.cross_entropy",
        "py:function",
        "generated/torch.nn.functional.cross_entropy.html",
        "$",
    ),
    (
        "torch.nn.functional.log_softmax",
        "py:function",
        "generated/torch.nn.functional.log_softmax.html",
        "$",
    ),
    (
        "torch.nn.parallel.DistributedDataParallel",
        "py:class",
        "generated/torch.nn.parallel.DistributedDataParallel.html",
        "$",
    ),
    ("torch.optim.AdamW", "py:class", "generated/torch.optim.AdamW.html", "$"),
    ("torch.optim.SparseAdam", "py:class", "generated/torch.optim.SparseAdam.html", "$"),
    ("torch.utils.benchmark", "py:module", "benchmark_utils.html", "module-torch.utils.benchmark"),
]

#: The same for the Python standard library names that signatures use
#: (relative to https://docs.python.org/3/).
PYTHON_ENTRIES: list[tuple[str, str, str, str]] = [
    ("collections.abc.Iterable", "py:class", "library/collections.abc.html", "$"),
    ("collections.abc.Iterator", "py:class", "library/collections.abc.html", "$"),
    ("collections.abc.Sequence", "py:class", "library/collections.abc.html", "$"),
    ("collections.abc.Callable", "py:class", "library/collections.abc.html", "$"),
    ("typing.NamedTuple", "py:class", "library/typing.html", "$"),
    ("typing.Any", "py:data", "library/typing.html", "$"),
]


def inventory_bytes(project: str = "PyTorch", entries: list | None = None) -> bytes:
    """The inventory file's content, in the format of ``sphinx.util.inventory``.

    Args:
        project: the project name written in the header.
        entries: the entries. Default: :data:`ENTRIES` (PyTorch).

    Returns:
        The header followed by the zlib-compressed entry lines.
    """
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        "# Version: stable\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    lines = []
    for name, role, page, anchor in ENTRIES if entries is None else entries:
        uri = f"{page}#{anchor}"
        lines.append(f"{name} {role} 1 {uri} -\n")
    body = "".join(lines).encode("utf-8")
    return header.encode("utf-8") + zlib.compress(body, 9)


def write_inventory(path: Path, project: str = "PyTorch", entries: list | None = None) -> Path:
    """Write an inventory to ``path`` if its content changed.

    Args:
        path: where to write, e.g. ``docs/_inv/torch.inv``.
        project: the project name. Default: ``"PyTorch"``.
        entries: the entries. Default: :data:`ENTRIES`.

    Returns:
        ``path``.
    """
    data = inventory_bytes(project, entries)
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return path


if __name__ == "__main__":
    print(write_inventory(Path(__file__).with_name("torch.inv")))
    print(write_inventory(Path(__file__).with_name("python.inv"), "Python", PYTHON_ENTRIES))
