"""Finance's daily digest and the held-refunds notice, posted to RECONCILE_ALERT_WEBHOOK_URL
(Slack-compatible `{"text": ...}`), through the alerts' own `post_webhook` (never prints the URL)."""

from __future__ import annotations

from reconcile.alerts import post_webhook
from reconcile.reports.books_out import WrittenBook

BIGGEST = 5


def digest_text(written: WrittenBook) -> str:
    book = written.book
    s = book.summary
    tie = book.tie_out
    lines = [
        f"*reconcile book of {book.period.key}* ({book.period.timezone})",
        f"Refunds: {s.refunds:,} for {s.credits_refunded:,} credits"
        + (f" ({', '.join(f'{v} {c:,}' for v, (_, c) in sorted(s.by_vendor.items()))})" if s.by_vendor else ""),
        f"Held, waiting for approval: {s.held_waiting:,} ({s.held_waiting_credits:,} credits)"
        + (": `reconcile refunds list`" if s.held_waiting else ""),
        f"Leakage: {s.opened:,} opened, {s.resolved:,} resolved, {s.still_open:,} still open; "
        f"{s.credits_at_risk:,} credits at risk",
        "Ledger: ties out" if tie.ties else "Ledger: DOES NOT tie out, see the book",
    ]
    if book.previous is not None:
        delta = s.credits_refunded - book.previous.credits_refunded
        lines.append(f"Since {book.previous.key}: {delta:+,} credits refunded")
    if book.refunds:
        lines.append("Biggest refunds: " + "; ".join(
            f"{r.job_id} {r.vendor or '(no job)'} {r.credits:,}" for r in book.refunds[:BIGGEST]))  # fmt: skip
    waiting = sorted((h for h in book.holds if h.status == "held"), key=lambda h: -h.credits)
    if waiting:
        lines.append("Biggest holds: " + "; ".join(f"{h.job_id} {h.vendor} {h.credits:,}" for h in waiting[:BIGGEST]))
    lines.append(f"Book: {next(p for p in written.paths if str(p).endswith('book.html'))}")
    return "\n".join(lines)


def post_digest(webhook_url: str, written: WrittenBook) -> str:
    """Post the digest; raise alerts.WebhookError (without the URL) when the receiver refuses it."""
    text = digest_text(written)
    post_webhook(webhook_url, {"text": text})
    return text


def held_notice(held_count: int, held_credits: int, vendors: list[str], run_id: str) -> str:
    return (
        f"*reconcile: {held_count:,} refund(s) of {held_credits:,} credits held for approval* "
        f"({', '.join(vendors)}; pass {run_id}). Nothing was written for them. Decide with "
        f"`reconcile refunds approve|reject --run-id {run_id} --by NAME --note TEXT` or the decide_held_refunds job."
    )
