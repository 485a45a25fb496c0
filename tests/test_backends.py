"""The model trains to the same losses with our Triton kernels as with the PyTorch backends."""
import pytest
import torch

from fasttrain.model import GPT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _train_losses(attention, loss, steps=4):
    torch.manual_seed(0)
    model = GPT(n_layer=2, d_model=32, n_head=2, vocab_size=203, context_length=64,
                attention=attention, loss=loss).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 203, (2, 41), generator=g).to(DEVICE)  # odd length: partial blocks
    losses = []
    for _ in range(steps):  # one batch seen again and again: the loss must fall
        loss_value = model(tokens[:, :-1], tokens[:, 1:])
        loss_value.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss_value.item())
    return losses


@pytest.mark.parametrize("attention, loss", [("triton", "torch"), ("torch", "triton"), ("triton", "triton")])
def test_triton_backends_train_like_torch(attention, loss):
    reference = _train_losses("torch", "torch")
    ours = _train_losses(attention, loss)
    assert ours == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert ours[-1] < ours[0]
