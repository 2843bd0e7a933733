#!/usr/bin/env python3
"""Checks every relative link in README.md and docs/**/*.md: the target file
exists, and a #anchor names a heading of the target (GitHub-style slug).

    python3 docs/check-links.py
"""
import os, re, sys, glob
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
files = [os.path.join(root, 'README.md')] + sorted(glob.glob(os.path.join(root, 'docs', '**', '*.md'), recursive=True))

def slug(h):
    h = h.strip().lower()
    h = re.sub(r'[^\w\- ]', '', h)  # drop punctuation (GitHub keeps - and _)
    return h.replace(' ', '-')

def anchors(path):
    out, counts, fence = set(), {}, False
    for line in open(path, encoding='utf-8'):
        if line.startswith('```'):
            fence = not fence; continue
        if fence: continue
        m = re.match(r'^(#{1,6})\s+(.*?)\s*#*\s*$', line)
        if m:
            text = re.sub(r'`', '', m.group(2))
            text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text)
            s = slug(text)
            n = counts.get(s, 0); counts[s] = n + 1
            out.add(s if n == 0 else f'{s}-{n}')
    return out

bad = 0; total = 0
for f in files:
    fence = False
    for ln, line in enumerate(open(f, encoding='utf-8'), 1):
        if line.startswith('```'):
            fence = not fence; continue
        if fence: continue
        for m in re.finditer(r'!?\[[^\]]*\]\(([^)\s]+)\)', line):
            t = m.group(1)
            if re.match(r'^[a-z]+:', t): continue
            total += 1
            path, _, frag = t.partition('#')
            target = os.path.normpath(os.path.join(os.path.dirname(f), path)) if path else f
            if not os.path.exists(target):
                print(f'{os.path.relpath(f, root)}:{ln}: missing file {t}'); bad += 1; continue
            if frag:
                if not target.endswith('.md'):
                    print(f'{os.path.relpath(f, root)}:{ln}: anchor on non-md {t}'); bad += 1; continue
                if frag not in anchors(target):
                    print(f'{os.path.relpath(f, root)}:{ln}: missing anchor {t}'); bad += 1
print(f'{total} relative links checked, {bad} broken')
sys.exit(1 if bad else 0)
