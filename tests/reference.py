"""The paper's method written plainly, as the tests' ground truth: one concatenated sequence, one attention."""

import copy

import torch


def attention_rows(layer, sequence, mask=None):
    """Plain multi-head attention of a ViTLayer over ``sequence`` (B, L, D) after its layernorm_before."""
    attention = layer.attention
    batch, length, _ = sequence.shape
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    normed = layer.layernorm_before(sequence)

    def split(t):
        return t.view(batch, length, heads, head_dim).transpose(1, 2)

    q, k, v = split(attention.q_proj(normed)), split(attention.k_proj(normed)), split(attention.v_proj(normed))
    scores = q @ k.transpose(-1, -2) * head_dim**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
    return attention.o_proj(out)


def mlp_block(layer, x):
    return x + layer.mlp(layer.layernorm_after(x))


def reference_full_layer(layer, x, memory):
    """Paper Fig. 2: [x; E] -> LN -> attention over all -> keep the first len(x) outputs -> MLP."""
    n = x.shape[1]
    sequence = x if memory is None else torch.cat([x, memory.expand(x.shape[0], -1, -1)], 1)
    return mlp_block(layer, x + attention_rows(layer, sequence)[:, :n])


def reference_full_model(vit, class_token, memories, head, pixels, interpolate=True):
    """Full-attention memory model: the task's class token at position 0, memory in every layer of ``memories``."""
    embedded = vit.embeddings(pixels, interpolate_pos_encoding=interpolate)
    x = torch.cat([class_token.expand(embedded.shape[0], 1, -1), embedded[:, 1:]], 1)
    for i, layer in enumerate(vit.layers):
        base_layer = getattr(layer, "base_layer", layer)
        x = reference_full_layer(base_layer, x, memories.get(i))
    return head(vit.layernorm(x[:, 0]))


def reference_masked_model(vit, class_tokens, memories, pixels, interpolate=True):
    """Masked mode as one big sequence [c0; p; c_1..c_T; E_1..E_T] with a boolean mask; returns base and task outputs.

    ``memories[t]`` maps layer index -> (m_t, D) for task t.
    """
    embedded = vit.embeddings(pixels, interpolate_pos_encoding=interpolate)
    batch, n, _ = embedded.shape
    num_tasks = len(class_tokens)
    x = torch.cat([embedded, torch.stack(class_tokens).expand(batch, -1, -1)], 1)
    for i, layer in enumerate(vit.layers):
        base_layer = getattr(layer, "base_layer", layer)
        blocks = [memories[t].get(i) for t in range(num_tasks)]
        sizes = [0 if b is None else b.shape[0] for b in blocks]
        length = n + num_tasks + sum(sizes)
        mask = torch.zeros(length, length, dtype=torch.bool)
        mask[:n, :n] = True
        start = n + num_tasks
        for t in range(num_tasks):
            row = n + t
            mask[row, :n] = True
            mask[row, row] = True
            mask[row, start : start + sizes[t]] = True
            start += sizes[t]
        mask[n + num_tasks :, :] = True  # memory rows: outputs are dropped; any pattern avoids NaNs
        sequence = torch.cat([x] + [b.expand(batch, -1, -1) for b in blocks if b is not None], 1)
        x = mlp_block(base_layer, x + attention_rows(base_layer, sequence, mask)[:, : n + num_tasks])
    normed = vit.layernorm(x)
    return normed[:, :n], normed[:, n:]


def reference_branch_model(vit, class_token, memories, start, updates, pixels, interpolate=True):
    """One masked task whose last layers, from ``start``, are its branch: below it, masked mode (the task's row reads
    the base rows, itself and its memory); from it, [c_t; base patches at ``start``] through copies of the stock
    layers whose q and v weights carry ``updates[i]`` = (delta_q, delta_v), each (D, D), with the task's memory at
    full attention. Returns (the base rows' final outputs, the task's final-normed class token)."""
    embedded = vit.embeddings(pixels, interpolate_pos_encoding=interpolate)
    batch, n, _ = embedded.shape
    x = torch.cat([embedded, class_token.expand(batch, 1, -1)], 1)
    branch = None
    for i, layer in enumerate(vit.layers):
        base_layer = getattr(layer, "base_layer", layer)
        if i == start:
            branch = torch.cat([x[:, n:], x[:, 1:n]], 1)
        if branch is not None:
            adapted = copy.deepcopy(base_layer)
            if i in updates:
                with torch.no_grad():
                    adapted.attention.q_proj.weight += updates[i][0]
                    adapted.attention.v_proj.weight += updates[i][1]
            branch = reference_full_layer(adapted, branch, memories.get(i))
        memory = memories.get(i) if branch is None else None
        sequence = x if memory is None else torch.cat([x, memory.expand(batch, -1, -1)], 1)
        mask = torch.ones(sequence.shape[1], sequence.shape[1], dtype=torch.bool)
        mask[:n, n:] = False  # base rows read base rows only
        x = mlp_block(base_layer, x + attention_rows(base_layer, sequence, mask)[:, : n + 1])
    task = x[:, n] if branch is None else branch[:, 0]
    return vit.layernorm(x[:, :n]), vit.layernorm(task)
