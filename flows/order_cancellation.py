"""The demo process: cancelling customer orders across three simulated systems.

A cancellation request passes through

1. ``CRM``  – validate the customer (blocked customers are rejected: business error 10),
2. ``SAP``  – two stages: ``cancel_order`` (shipped orders are rejected: 20; flaky orders hit
   an RFC timeout twice before they go through) and ``refund`` (refunds above 2,000 need an
   approval: business error 21),
3. ``MAIL`` – notify the customer (the mail server is down for some items on the first try).

Outcomes are deterministic: they follow the columns of ``flows/data/cancellations.csv``.
Copy this module to write a process of your own. Run it end to end with ``make demo``
(``python -m flows.demo``); ``TRACKING_PROCESSES=flows.order_cancellation:process`` is the
default.
"""

from __future__ import annotations

from pathlib import Path

from tracking import BusinessError, ExecutionResult, KeyFields, Process, RetryPolicy, TxContext

SAMPLE_FILE = Path(__file__).parent / "data" / "cancellations.csv"
REFUND_APPROVAL_LIMIT = 2000

process = Process(
    "ORDER_CANCELLATION",
    dedup=KeyFields("request_id"),
    description="Cancel a customer order in CRM and SAP, refund it and tell the customer.",
)


@process.platform("CRM", order=1, retry=RetryPolicy(max_attempts=3, delay=60))
def validate_customer(tx: TxContext) -> int:
    """Business rule: blocked customers cannot cancel orders themselves."""
    if tx.payload.get("customer_status") == "blocked":
        raise BusinessError(10, f"customer {tx.payload.get('customer')} is blocked in CRM")
    return 0


@process.platform(
    "SAP",
    order=2,
    stages=("cancel_order", "refund"),
    retry=RetryPolicy(max_attempts=4, delay=0, backoff=2),
    retries=1,  # one quick in-run retry of system errors; later runs do the rest
)
def sap(tx: TxContext) -> ExecutionResult | int:
    """Cancel the sales order, then book the refund."""
    if tx.stage == "cancel_order":
        if tx.payload.get("order_status") == "shipped":
            return ExecutionResult(20, f"order {tx.payload.get('order_id')} already shipped")
        if tx.payload.get("sap_flaky") and tx.attempt < 3:
            return ExecutionResult(-5, "SAP RFC timeout")
        return 0
    if float(tx.payload.get("amount") or 0) > REFUND_APPROVAL_LIMIT:
        return ExecutionResult(21, f"refund above the approval limit of {REFUND_APPROVAL_LIMIT}")
    return 0


@process.platform("MAIL", order=3, retry=RetryPolicy(delay=0))
def notify_customer(tx: TxContext) -> int:
    """Send the confirmation mail (unlimited retries: the mail must go out)."""
    if tx.payload.get("mail_flaky") and tx.attempt == 1:
        raise ConnectionError("SMTP server unavailable")
    tx.logger.info("mail sent for %s", tx.business_key)
    return 0
