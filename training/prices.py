"""On-demand SageMaker prices (us-east-1, USD per instance-hour, the same for training and hosting).

A dated copy from public Price-List data: prices change, so callers show PRICES_DATE next to any cost
and let users override the table (`prices=`). Spot training is often planned at 30-35% of these.
"""
from __future__ import annotations

PRICES_DATE = "2025-2026 (public Price-List copies, us-east-1 on-demand)"

PRICES_USD_PER_HOUR = {
    "ml.g5.2xlarge": 1.515,
    "ml.g5.12xlarge": 7.09,
    "ml.g6e.xlarge": 2.61,
    "ml.g6e.2xlarge": 2.80,
    "ml.g6e.4xlarge": 3.76,
    "ml.g6e.12xlarge": 13.12,
    "ml.p4d.24xlarge": 37.688,   # before the mid-2025 P4/P5 price cut (~25.25 after it, unconfirmed)
}


def hourly_cost(instance_type: str, count: int = 1, prices: dict | None = None) -> float | None:
    """USD per hour for `count` instances, or None when the type is not in the table."""
    rate = (prices or PRICES_USD_PER_HOUR).get(instance_type)
    return None if rate is None else rate * count


def describe_cost(instance_type: str, count: int = 1, prices: dict | None = None) -> str:
    """One line for users: the hourly and monthly cost, or that the price is unknown."""
    rate = hourly_cost(instance_type, count, prices)
    if rate is None:
        return (f"{count} x {instance_type}: price not in the table (prices of {PRICES_DATE}); "
                "check https://aws.amazon.com/sagemaker/pricing/")
    return (f"{count} x {instance_type}: ${rate:.2f}/hour, about ${rate * 24 * 30:,.0f} a month while it runs "
            f"(prices of {PRICES_DATE})")
