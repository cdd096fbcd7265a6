"""Caption metrics: BLEU-1..4 / METEOR / ROUGE-L / CIDEr against references (pycocoevalcap's COCOEvalCap
computation, PTB tokenizer included), CLIPScore, RefCLIPScore and RefCompare with the frozen retriever, and
vocabulary statistics. SPICE needs Stanford CoreNLP, which cannot be
downloaded here: it is reported as unavailable with the reason, never as 0."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from typing import Sequence

import numpy as np
import torch

SPICE_UNAVAILABLE = "SPICE needs Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use; " \
                    "this machine has no internet access"


JAVA_UNAVAILABLE = "pycocoevalcap's PTB tokenizer and METEOR run on Java, and no `java` is on the PATH"


METEOR_TIMEOUT_S = 120.0  # the longest wait for one answer of the METEOR process (its start loads paraphrase tables)


class MeteorError(RuntimeError):
    """The METEOR process failed or gave no answer in time: one line naming the caption it was scoring."""


class _MeteorProcess:
    """pycocoevalcap's METEOR 1.5 jar, spoken to as `pycocoevalcap.meteor.meteor.Meteor` does (the same command
    and lines, so the same scores), with every answer awaited at most `timeout` seconds: a process that dies or
    stays silent is killed and a `MeteorError` names the caption. (pycocoevalcap's wrapper reads without a
    bound, and when the process returns nothing its ValueError leaves its lock held, on which its `__del__`
    then waits forever.)"""

    COMMAND = ("java", "-jar", "-Xmx2G", "{jar}", "-", "-", "-stdio", "-l", "en", "-norm")  # pycocoevalcap's

    def __init__(self, timeout: float = METEOR_TIMEOUT_S):
        import os
        import queue
        import subprocess
        import tempfile
        import threading

        from pycocoevalcap.meteor import meteor as pycoco_meteor

        self.timeout = timeout
        self.stderr = tempfile.TemporaryFile()  # read for the error message (a pipe nobody reads can fill up)
        self.proc = subprocess.Popen([part.format(jar=pycoco_meteor.METEOR_JAR) for part in self.COMMAND],
                                     cwd=os.path.dirname(os.path.abspath(pycoco_meteor.__file__)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.answers: queue.Queue = queue.Queue()
        self.requests: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.answers.put(line)
        self.answers.put(None)  # end of output: the process ended

    def _write(self) -> None:  # a write can block (a full pipe): here, so an answer's timeout bounds it too
        while (text := self.requests.get()) is not None:
            try:
                self.proc.stdin.write(text.encode())
                self.proc.stdin.flush()
            except (OSError, ValueError):
                return

    def answer(self, what: str) -> str:
        import queue

        try:
            line = self.answers.get(timeout=self.timeout)
        except queue.Empty:
            raise MeteorError(f"meteor: no answer from the METEOR process within {self.timeout:g} s while scoring "
                              f"{what}; it was stopped") from None
        if line is None:
            import subprocess

            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.stderr.seek(0)
            said = [x for x in self.stderr.read().decode(errors="replace").splitlines() if x.strip()]
            raise MeteorError(f"meteor: the METEOR process ended (exit code {self.proc.returncode}) while scoring "
                              f"{what}" + (f": {said[-1].strip()[:200]}" if said else ""))
        return line.decode(errors="replace").strip()

    def ask(self, line: str, what: str) -> str:
        self.requests.put(line + "\n")
        return self.answer(what)

    def close(self) -> None:
        """Stop the process (killed first: a writer blocked on its full pipe then fails and lets go of it)."""
        self.requests.put(None)
        self.proc.kill()
        self.proc.wait()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.stderr.close()


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def meteor_score(gts: dict, res: dict, names: Sequence[str] | None = None,
                 timeout: float = METEOR_TIMEOUT_S) -> tuple[float, list[float]]:
    """METEOR as `pycocoevalcap.meteor.meteor.Meteor().compute_score(gts, res)` computes it (gts: {key:
    [tokenized references]}, res: {key: [tokenized caption]}), the process bounded (`_MeteorProcess`).
    `names[i]`: how the i-th caption is named in an error (default: `caption i`). Raises MeteorError."""
    keys = list(gts.keys())
    if set(keys) != set(res.keys()):
        raise ValueError("gts and res must score the same keys")
    label = [f"caption {i}" if names is None else str(names[i]) for i in range(len(keys))]
    proc = _MeteorProcess(timeout)
    try:
        stats = []
        for i, key in enumerate(keys):
            if len(res[key]) != 1:
                raise ValueError(f"{label[i]}: one caption per key, got {len(res[key])}")
            hypothesis = res[key][0].replace("|||", "").replace("  ", " ")
            stat = proc.ask(" ||| ".join(("SCORE", " ||| ".join(gts[key]), hypothesis)), label[i])
            if not stat or not all(_is_number(x) for x in stat.split()):
                raise MeteorError(f"meteor: the METEOR process answered {stat[:80]!r}, not the statistics of "
                                  f"{label[i]}")
            stats.append(stat)
        proc.requests.put("EVAL" + "".join(f" ||| {stat}" for stat in stats) + "\n")
        scores = []
        for i in range(len(keys) + 1):
            what = label[i] if i < len(keys) else "the corpus score"
            text = proc.answer(f"{what} (EVAL)")
            try:
                scores.append(float(text))
            except ValueError:
                raise MeteorError(f"meteor: the METEOR process answered {text[:80]!r}, not a score, for "
                                  f"{what}") from None
        return scores[-1], scores[:-1]
    finally:
        proc.close()


PTB_NOTICE = "PTBTokenizer tokenized "  # the line the tokenizer's Java prints to stderr on every call


@contextlib.contextmanager
def ptb_notices_dropped():
    """Around pycocoevalcap's PTB tokenizer, whose Java child writes a "PTBTokenizer tokenized N tokens at ..." line
    per call to the inherited stderr: fd 2 goes to a temporary file, and every other line written meanwhile (an
    error of the tokenizer, anything else) is written back to stderr afterwards."""
    stderr = sys.stderr or sys.__stderr__
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a detached process): nothing is printed anyway
        yield
        return
    try:
        with tempfile.TemporaryFile() as held:
            if stderr is not None:
                stderr.flush()
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                held.seek(0)
                kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                        if not line.startswith(PTB_NOTICE)]
                if kept and stderr is not None:
                    stderr.write("".join(kept))
                    stderr.flush()
    finally:
        os.close(saved)


def ngram_metrics(captions: Sequence[str], references: Sequence[Sequence[str]], meteor: bool = True,
                  ids: Sequence[str] | None = None) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of captions against their references, exactly as pycocoevalcap's
    `COCOEvalCap` computes them: its Stanford PTB tokenizer (Java) on both sides, then its scorers. Without Java
    the metrics are listed in `unavailable` with the reason, never reported as 0. METEOR runs bounded
    (`meteor_score`): when its process fails, METEOR is listed in `unavailable` with the caption it was scoring
    (`ids`: the images' ids, to name it) and a warning, and the other metrics are kept."""
    if not shutil.which("java"):
        names = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"] + (["meteor"] if meteor else [])
        return {"unavailable": {name: JAVA_UNAVAILABLE for name in names}}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    with ptb_notices_dropped():
        gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
        res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        names = None if ids is None else [f"the caption of image_id {i!r}" for i in ids]
        try:
            out["meteor"] = float(meteor_score(gts, res, names)[0])
        except MeteorError as e:
            import sys

            print(f"warning: {e}", file=sys.stderr)
            out["unavailable"] = {"meteor": str(e)}
    return out


@torch.no_grad()
def clip_metrics(retriever, captions: Sequence[str], image_emb: torch.Tensor,
                 references: Sequence[Sequence[str]] | None = None, text_emb: torch.Tensor | None = None) -> dict:
    """CLIPScore, RefCLIPScore (Hessel et al. 2021) and RefCompare, all with the frozen retriever's embeddings.

    CLIPScore = 2.5 * max(cos(caption, image), 0). RefCLIPScore = the harmonic mean of CLIPScore and
    max(max over references of cos(caption, reference), 0), per image (0 where both are 0). RefCompare: per
    image, the share of its references whose CLIP score is lower than the generated caption's (>= 0.5: as good
    as the references). Each is the mean over images. `text_emb`: the captions' embeddings when already encoded.
    The captions are encoded as they are (no "A photo depicts"
    prompt: the world's retriever was never trained on one)."""
    text = retriever.encode_captions(list(captions)) if text_emb is None else text_emb
    cos = (text * image_emb).sum(-1)
    clip_s = 2.5 * cos.clamp(min=0)
    out = {"clipscore": float(clip_s.mean())}
    if references is not None:
        k = torch.tensor([len(r) for r in references])
        ref_emb = retriever.encode_captions([r for refs in references for r in refs])
        owner = torch.arange(len(k)).repeat_interleave(k)
        ref_cos = (ref_emb * image_emb[owner]).sum(-1)
        shares = [float((rc < c).float().mean()) for rc, c in zip(ref_cos.split(k.tolist()), cos)]
        out["refcompare"] = float(np.mean(shares))
        text_ref = torch.stack([s.max() for s in (ref_emb * text[owner]).sum(-1).split(k.tolist())]).clamp(min=0)
        denominator = clip_s + text_ref
        harmonic = torch.where(denominator > 0, 2 * clip_s * text_ref / denominator.clamp(min=1e-12), 0.0)
        out["refclipscore"] = float(harmonic.mean())
    return out


COLLAPSE_SHARE = 0.2  # one caption for more than a fifth of the images: the captioner has collapsed


def distinct_n(captions: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams over all n-grams of all captions (lower-cased words)."""
    grams = [tuple(w[k:k + n]) for c in captions for w in [c.lower().split()] for k in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def vocabulary_metrics(captions: Sequence[str]) -> dict:
    """Diversity: vocabulary size, distinct-1/2, the share of unique captions, the most frequent caption and its
    share, and a `collapse_warning` when that share exceeds COLLAPSE_SHARE."""
    from collections import Counter

    words = [w for c in captions for w in c.split()]
    top, count = Counter(captions).most_common(1)[0] if captions else ("", 0)
    share = count / max(1, len(captions))
    out = {"vocab_size": len(set(words)), "unique_caption_ratio": len(set(captions)) / max(1, len(captions)),
           "mean_length": float(np.mean([len(c.split()) for c in captions])) if captions else 0.0,
           "distinct_1": distinct_n(captions, 1), "distinct_2": distinct_n(captions, 2),
           "top_caption": top, "top_caption_share": share}
    if share > COLLAPSE_SHARE:
        out["collapse_warning"] = (f"captions collapsed: {share:.0%} of the images get the same caption "
                                   f"({top!r})")
    return out
