"""Train the project's default model: a tiny Llama on TinyShakespeare.

The serving stack needs a real Llama-architecture checkpoint (GQA, RoPE,
RMSNorm, SwiGLU, tied embeddings) that is small enough to live in the repo
(<= 8 MB of weights) and loads on a CPU in tests, yet produces recognisable
text so that end-to-end outputs can be eyeballed.

    python tools/train_default_model.py --steps 6000 --max-seconds 210 --out model_repository/llm/tiny-shakespeare

Writes config.json, generation_config.json, model.safetensors (bfloat16),
tokenizer.json and tokenizer_config.json to --out.

What we saw (H100, the command above): the held-out loss is lowest at the
first evaluation (step 250, val 4.38 nats/token, ~1.35 nats/char) and then
rises as the model memorises the 1 MB corpus (train loss -> 0.1). The saved
weights are the best-val checkpoint, so the extra steps cost only time; a
rerun could use e.g. --steps 600 --eval-every 25 to land nearer the optimum.
"""

import argparse
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DATA = Path(__file__).parent / "data" / "tinyshakespeare.txt"
PROMPT = "To be or not to be, that is"
# Chat as a play (the OpenAI front renders it): the user speaks as First Citizen (or the message's
# `name`), the model answers as Second Citizen; a system message is a stage direction. It starts
# with <s> as every training window did (chat prompts are tokenized without the tokenizer's own).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] ~ '\\n\\n' }}"
    "{% else %}{% set speaker = message['name'] if message['name'] else "
    "('First Citizen' if message['role'] == 'user' else 'Second Citizen') %}"
    "{{ speaker ~ ':\\n' ~ message['content'] ~ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Second Citizen:\\n' }}{% endif %}")
BOS, EOS = "<s>", "</s>"


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    # Byte-level BPE: every byte string is encodable, so the server never
    # meets an unknown token whatever the client sends.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    bos_id = tok.token_to_id(BOS)
    # Prepend <s> to every prompt, as Llama tokenizers do; training windows
    # also start with <s> so the model knows what follows it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, model_max_length=1024
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    # ~3.9M params -> ~7.8 MB in bfloat16. head_dim 64 keeps attention
    # kernels on their common fast path; 4 query heads share 2 KV heads (GQA).
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=480,  # SwiGLU MLP
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_dropout=0.1,  # mild regularisation: 1 MB of text overfits fast; off at inference
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@torch.no_grad()
def evaluate(model, val: torch.Tensor, bos_id: int, ctx: int, device, amp) -> float:
    # Deterministic: non-overlapping windows covering the whole held-out split.
    model.eval()
    n = (len(val) - 1) // (ctx - 1)
    starts = torch.arange(n) * (ctx - 1)
    losses = []
    for chunk in starts.split(64):
        x = batch_at(val, chunk, bos_id, ctx).to(device)
        with amp():
            losses.append(model(input_ids=x, labels=x).loss.float().item() * len(chunk))
    model.train()
    return sum(losses) / n


def batch_at(data: torch.Tensor, starts: torch.Tensor, bos_id: int, ctx: int) -> torch.Tensor:
    # Each window is <s> + (ctx-1) tokens; HF shifts labels internally.
    rows = [torch.cat([torch.tensor([bos_id]), data[s : s + ctx - 1]]) for s in starts.tolist()]
    return torch.stack(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="training time budget; the LR schedule anneals by it and training stops there")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    t0 = time.time()

    text = DATA.read_text(encoding="utf-8")
    tokenizer = train_tokenizer(text, args.vocab_size)
    bos_id = tokenizer.bos_token_id
    ids = torch.tensor(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)
    split = int(0.9 * len(ids))  # last 10% (end of the play) held out
    train, val = ids[:split], ids[split:]
    print(f"tokenizer: vocab {len(tokenizer)}, {len(ids)} tokens ({len(text) / len(ids):.2f} chars/token), "
          f"{time.time() - t0:.1f}s")

    config = make_config(tokenizer)
    model = LlamaForCausalLM(config).to(device)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")

    # Keep fp32 master weights; bf16 autocast only where it is fast (CUDA).
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        amp = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731

    # No weight decay on norms (1-D params), as is usual for transformers.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    warmup = min(100, args.steps // 10)

    def progress(step: int) -> float:
        # Fraction of training done: by steps, or by wall clock when a time
        # budget is given, whichever is further, so the LR always anneals.
        return max(step / args.steps, (time.time() - t_train) / args.max_seconds)

    def lr_at(step: int, frac: float) -> float:
        # Linear warmup, then cosine down to 10% of the peak.
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    # 1.1 MB of text is many epochs for this model; remember the weights with
    # the best held-out loss so overfitting late in training cannot hurt.
    best_val, best_state, best_step = float("inf"), None, 0
    t_train = time.time()
    step = 0
    for step in range(args.steps):
        frac = progress(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, frac)
        starts = torch.randint(0, len(train) - args.ctx, (args.batch_size,))
        x = batch_at(train, starts, bos_id, args.ctx).to(device, non_blocking=True)
        with amp():
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        last = step == args.steps - 1 or progress(step + 1) >= 1.0
        if (step + 1) % args.eval_every == 0 or last:
            v = evaluate(model, val, bos_id, args.ctx, device, amp)
            if v < best_val:
                best_val, best_step = v, step + 1
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
            print(f"step {step + 1:5d}  train {loss.item():.3f}  val {v:.3f}  lr {lr_at(step, frac):.2e}  "
                  f"{time.time() - t_train:.0f}s", flush=True)
        if last:
            break

    model.load_state_dict(best_state)
    print(f"best val loss {best_val:.4f} at step {best_step} of {step + 1}")

    # Save in bfloat16: halves the checkpoint so it fits in the repo.
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    )
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)

    # Reload what was written, as the server will, and show some text.
    model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(device).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(args.out)
    enc = tok(PROMPT, return_tensors="pt").to(device)
    greedy = model.generate(**enc, max_new_tokens=60, do_sample=False)
    torch.manual_seed(0)
    sampled = model.generate(**enc, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=50)
    print(f"final val loss: {best_val:.4f}")
    print("greedy: ", repr(tok.decode(greedy[0], skip_special_tokens=True)))
    print("sampled:", repr(tok.decode(sampled[0], skip_special_tokens=True)))
    print(f"total time {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
