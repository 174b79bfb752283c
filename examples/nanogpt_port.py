"""A nanoGPT-style training loop, ported to torch_ckpt_hook (docs/porting-a-pytorch-loop.md).

A tiny character-level transformer trained on a built-in text. Its hand-rolled checkpoint code
(``torch.save({"model": ..., "optimizer": ..., "model_args": ..., "iter_num": ...,
"best_val_loss": ..., "config": ...})`` every ``eval_interval`` steps, resume by hand) is replaced
by ``MonitoredTrainingSession``: the metadata lives in ``extra_state`` as a plain dict, restored
in place; the LR schedule is a scheduler in ``extra_state``; resuming is automatic.

Run it twice: the second run resumes where the first stopped.

    python examples/nanogpt_port.py --dir /tmp/nanogpt --max-iters 60
    python examples/nanogpt_port.py --dir /tmp/nanogpt --max-iters 120
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
from torch import nn

import torch_ckpt_hook as tch

TEXT = (
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
    "First Citizen: You are all resolved rather to die than to famish? All: Resolved. resolved. "
) * 8


class TinyGPT(nn.Module):
    """Token and position embeddings, transformer blocks, a language-model head."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int, n_layer: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        layer = nn.TransformerEncoderLayer(
            n_embd, nhead=2, dim_feedforward=4 * n_embd, dropout=0.1, batch_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.head = nn.Linear(n_embd, vocab_size)
        mask = torch.triu(torch.full((block_size, block_size), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/torch_ckpt_hook_nanogpt", help="checkpoint dir")
    parser.add_argument("--max-iters", type=int, default=120, help="train up to this step")
    parser.add_argument("--eval-interval", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)

    # nanoGPT's configuration and model arguments: plain values, checkpointed as they are.
    config = {"learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 10, "max_iters": 1000}
    chars = sorted(set(TEXT))
    model_args = {"vocab_size": len(chars), "block_size": 16, "n_embd": 32, "n_layer": 2}
    data = torch.tensor([chars.index(c) for c in TEXT])
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]

    torch.manual_seed(1337)
    model = TinyGPT(**model_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"])

    def lr_factor(it: int) -> float:  # nanoGPT's warmup then cosine decay, as a multiplier
        if it < config["warmup_iters"]:
            return (it + 1) / config["warmup_iters"]
        progress = (it - config["warmup_iters"]) / (config["max_iters"] - config["warmup_iters"])
        floor = config["min_lr"] / config["learning_rate"]
        return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # Restored in place: after a resume this dict holds the checkpoint's values.
    meta = {"best_val_loss": 1e9, "model_args": model_args, "config": config}

    def batch(source: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The batch depends on the step only, so a resumed run sees the batches it would have.
        g = torch.Generator().manual_seed(step)
        ix = torch.randint(len(source) - model.block_size - 1, (args.batch_size,), generator=g)
        x = torch.stack([source[i : i + model.block_size] for i in ix])
        y = torch.stack([source[i + 1 : i + 1 + model.block_size] for i in ix])
        return x, y

    def train_step(step: int) -> dict[str, torch.Tensor]:
        x, y = batch(train_data, step)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = []
        for k in range(4):
            x, y = batch(val_data, 10_000 + k)
            logits = model(x)
            losses.append(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))
        model.train()
        return float(torch.stack(losses).mean())

    hooks = [tch.StopAtStepHook(last_step=args.max_iters), tch.NanTensorHook("loss")]
    with tch.MonitoredTrainingSession(
        model,
        optimizer,
        checkpoint_dir=args.dir,
        save_checkpoint_steps=args.eval_interval,
        hooks=hooks,
        extra_state={"scheduler": scheduler, "meta": meta},
        log_step_count_steps=0,
    ) as sess:
        if sess.restored_from is not None:
            print(f"resumed from {sess.restored_from} at step {sess.global_step}")
        while not sess.should_stop():
            result = sess.run(train_step, sess.global_step)
            if sess.global_step % args.eval_interval == 0:
                # After run(): the checkpoint hook has already saved this step, so the best
                # value reaches the checkpoint of the next interval (docs: hook order).
                val = evaluate()
                meta["best_val_loss"] = min(meta["best_val_loss"], val)
                print(f"step {sess.global_step}: train {result['loss']:.4f}, val {val:.4f}")
    print(f"done at step {sess.global_step}; best val loss {meta['best_val_loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
