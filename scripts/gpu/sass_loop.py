"""Instruction mix of the innermost loop (with mma.sync) of the `gemv` kernel in a SASS listing."""
import collections
import re
import sys

lines = open(sys.argv[1]).read().split("\n")
start = next(i for i, l in enumerate(lines) if l.startswith(".text.gemv:"))
end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("//-----")), len(lines))
labels, ins = {}, []
for l in lines[start:end]:
    if re.match(r"^\.L_x_\d+:", l):
        labels[l[:-1]] = len(ins)
        continue
    m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", l)
    if m:
        ins.append((m.group(2), m.group(3)))
best = None
for i, (op, rest) in enumerate(ins):
    target = re.search(r"\((\.L_x_\d+)\)", rest) if op == "BRA" else None
    if target and labels[target.group(1)] < i:
        t = labels[target.group(1)]
        if any(o.startswith("HMMA") for o, _ in ins[t : i + 1]) and (best is None or i - t < best[1] - best[0]):
            best = (t, i)
t, i = best
mix = collections.Counter(o.split(".")[0] for o, _ in ins[t : i + 1])
print(f"innermost loop: {i - t + 1} instructions, {mix['HMMA']} HMMA "
      f"(~{8 * (i - t + 1) / max(mix['HMMA'], 1):.0f} per 128-wide step at one N tile)")
print(" ".join(f"{k}:{v}" for k, v in mix.most_common()))
