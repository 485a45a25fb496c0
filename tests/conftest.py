import os

import torch

# Triton kernels run under the interpreter when no GPU is present. The variable must be set before any
# @triton.jit function is defined, so before any test module imports fasttrain.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import random  # noqa: E402

import pytest  # noqa: E402

_WORDS = ("the cat dog sat ran on a mat log red big small quickly slowly and then saw it was here there "
          "who what when house tree river stone light dark old new").split()


def template_documents(n_docs=1000, seed=0):
    """Template sentences: predictable structure, so a tiny model learns well below the unigram entropy."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(3, 8)):
            a, b, c = rng.sample(_WORDS, 3)
            sents.append(f"The {a} {b} sat on the {c}. Then the {a} ran to the {c} and saw the {b}.")
        docs.append(" ".join(sents))
    return docs


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """A small prepared dataset (about 140k tokens, 320-token BPE, 5% test split) shared by the trainer tests."""
    from fasttrain.data import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "template"
    prepare_dataset(out, template_documents(), vocab_size=320, test_fraction=0.05, seed=0, progress=False)
    return str(out)
