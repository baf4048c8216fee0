# Per-instruction warp-stall samples of an Nsight Compute source page (`ncu --page source
# --print-source sass --csv`, see ncu_source.sh): totals by stall reason, the TOP instructions, and
# the share of each run of 32 instructions.
import csv, sys
rows=list(csv.reader(open(sys.argv[1])))
hdr=rows[1]; data=rows[2:]
ix={h:i for i,h in enumerate(hdr)}
def num(s):
    try: return float(s.replace(',',''))
    except: return 0.0
tot=sum(num(r[ix['Warp Stall Sampling (All Samples)']]) for r in data)
print('total samples', tot, 'instructions', len(data))
reasons=[h for h in hdr if h.startswith('stall_') and 'Not Issued' not in h]
# per reason totals
rt={h: sum(num(r[ix[h]]) for r in data) for h in reasons}
print('by reason:', ', '.join(f"{k[6:]} {v/tot*100:.1f}%" for k,v in sorted(rt.items(), key=lambda x:-x[1]) if v/tot>0.005))
# top instructions
top=sorted(data, key=lambda r:-num(r[ix['Warp Stall Sampling (All Samples)']]))[:int(sys.argv[2]) if len(sys.argv)>2 else 25]
for r in top:
    s=num(r[ix['Warp Stall Sampling (All Samples)']])
    why=sorted(((num(r[ix[h]]),h[6:]) for h in reasons), reverse=True)[:3]
    print(f"{r[0]:>6} {s/tot*100:5.1f}%  exec {r[ix['Instructions Executed']]:>9}  {r[1][:60]:60} | " + ', '.join(f"{w} {v/s*100:.0f}%" for v,w in why if v>0))
# group by region: find the address ranges: print cumulative sample share in chunks of 64 instructions
print()
cum=0
for i in range(0,len(data),32):
    s=sum(num(r[ix['Warp Stall Sampling (All Samples)']]) for r in data[i:i+32])
    ex=max(num(r[ix['Instructions Executed']]) for r in data[i:i+32])
    print(f"instr {i:4}-{i+31:4} {data[i][0]:>6}: {s/tot*100:5.1f}%  max exec {ex:,.0f}")
