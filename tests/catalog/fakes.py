"""Local fakes of the cloud APIs the sync calls, as real HTTP servers on 127.0.0.1.

- ``AwsPricingFake``: the AWS Pricing API's GetProducts (JSON protocol) and EC2's
  DescribeSpotPriceHistory (query protocol, XML), which moto does not serve usefully.
  EC2's instance types and offerings come from moto's own server.
- ``GcpFake``: Compute Engine's aggregated machine and accelerator type lists and the
  Cloud Billing Catalog's SKU list, paginated like the real APIs.

Each fake records the calls it answered and can be told to throttle or fail.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class AwsPricingFake:
    """On-demand prices per (region, instance type); spot per (region, zone, type)."""

    on_demand: dict[tuple[str, str], float]
    spot: dict[tuple[str, str, str], float] = field(default_factory=dict)
    page_size: int = 3
    throttle_next: int = 0
    fail_with: str | None = None
    calls: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        if target.endswith("GetProducts"):
            self.calls.append("GetProducts")
            return self._get_products(await request.json())
        form = await request.post()
        if form.get("Action") == "DescribeSpotPriceHistory":
            self.calls.append("DescribeSpotPriceHistory")
            return self._spot_history(form)
        return web.Response(status=400, text=f"unsupported call {target or form.get('Action')!r}")

    def _json_error(self, code: str) -> web.Response:
        return web.json_response(
            {"__type": code, "message": f"{code} from the fake"},
            status=400,
            content_type="application/x-amz-json-1.1",
        )

    def _get_products(self, body: dict[str, Any]) -> web.Response:
        if self.fail_with:
            return self._json_error(self.fail_with)
        if self.throttle_next > 0:
            self.throttle_next -= 1
            return self._json_error("ThrottlingException")
        wanted = {f["Field"]: f["Value"] for f in body.get("Filters", [])}
        region = wanted.get("regionCode")
        items = [
            _price_list_item(region=r, instance_type=t, usd=usd)
            for (r, t), usd in sorted(self.on_demand.items())
            if r == region
        ]
        start = int(body.get("NextToken") or 0)
        page = items[start : start + self.page_size]
        result: dict[str, Any] = {"FormatVersion": "aws_v1", "PriceList": page}
        if start + self.page_size < len(items):
            result["NextToken"] = str(start + self.page_size)
        return web.json_response(result, content_type="application/x-amz-json-1.1")

    def _spot_history(self, form: Any) -> web.Response:
        types = {value for key, value in form.items() if key.startswith("InstanceType.")}
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        items = "".join(
            "<item>"
            f"<availabilityZone>{escape(zone)}</availabilityZone>"
            f"<instanceType>{escape(instance_type)}</instanceType>"
            "<productDescription>Linux/UNIX</productDescription>"
            f"<spotPrice>{usd:.6f}</spotPrice><timestamp>{stamp}</timestamp>"
            "</item>"
            for (_, zone, instance_type), usd in sorted(self.spot.items())
            if instance_type in types
        )
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<DescribeSpotPriceHistoryResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
            "<requestId>fake</requestId>"
            f"<spotPriceHistorySet>{items}</spotPriceHistorySet><nextToken></nextToken>"
            "</DescribeSpotPriceHistoryResponse>"
        )
        return web.Response(text=xml, content_type="text/xml")


def _price_list_item(*, region: str, instance_type: str, usd: float) -> str:
    sku = f"SKU{abs(hash((region, instance_type))) % 10**8}"
    return json.dumps(
        {
            "product": {
                "productFamily": "Compute Instance",
                "sku": sku,
                "attributes": {
                    "instanceType": instance_type,
                    "regionCode": region,
                    "operatingSystem": "Linux",
                    "tenancy": "Shared",
                    "preInstalledSw": "NA",
                    "capacitystatus": "Used",
                    "marketoption": "OnDemand",
                },
            },
            "terms": {
                "OnDemand": {
                    f"{sku}.JRTCKXETXF": {
                        "priceDimensions": {
                            f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                                "unit": "Hrs",
                                "pricePerUnit": {"USD": f"{usd:.10f}"},
                            }
                        }
                    }
                }
            },
        }
    )


@dataclass
class GcpMachine:
    zone: str
    name: str
    vcpus: int
    memory_mb: int
    accelerator: tuple[str, int] | None = None


@dataclass
class GcpFake:
    """Machine types, accelerator types (zone -> {type: max cards}) and billing SKUs."""

    machines: list[GcpMachine]
    accelerators: dict[str, dict[str, int]]
    skus: list[dict[str, Any]]
    fail_billing: bool = False
    calls: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(
            "/compute/v1/projects/{project}/aggregated/machineTypes", self._machine_types
        )
        app.router.add_get(
            "/compute/v1/projects/{project}/aggregated/acceleratorTypes", self._accelerator_types
        )
        app.router.add_get("/v1/services/{service}/skus", self._skus)
        return app

    async def _machine_types(self, request: web.Request) -> web.Response:
        self.calls.append("machineTypes")
        zones = sorted({m.zone for m in self.machines})
        index = int(request.query.get("pageToken") or 0)  # one zone per page
        zone = zones[index]
        items = []
        for machine in self.machines:
            if machine.zone != zone:
                continue
            item: dict[str, Any] = {
                "name": machine.name,
                "zone": machine.zone,
                "guestCpus": machine.vcpus,
                "memoryMb": machine.memory_mb,
            }
            if machine.accelerator:
                item["accelerators"] = [
                    {
                        "guestAcceleratorType": machine.accelerator[0],
                        "guestAcceleratorCount": machine.accelerator[1],
                    }
                ]
            items.append(item)
        body: dict[str, Any] = {"items": {f"zones/{zone}": {"machineTypes": items}}}
        if index + 1 < len(zones):
            body["nextPageToken"] = str(index + 1)
        return web.json_response(body)

    async def _accelerator_types(self, request: web.Request) -> web.Response:
        self.calls.append("acceleratorTypes")
        project = request.match_info["project"]
        items = {
            f"zones/{zone}": {
                "acceleratorTypes": [
                    {
                        "name": name,
                        "zone": f"https://www.googleapis.com/compute/v1/projects/{project}/zones/{zone}",
                        "maximumCardsPerInstance": cards,
                    }
                    for name, cards in sorted(types.items())
                ]
            }
            for zone, types in sorted(self.accelerators.items())
        }
        return web.json_response({"items": items})

    async def _skus(self, request: web.Request) -> web.Response:
        self.calls.append("skus")
        if self.fail_billing:
            return web.json_response({"error": {"code": 403, "message": "denied"}}, status=403)
        start = int(request.query.get("pageToken") or 0)
        size = 4
        body: dict[str, Any] = {"skus": self.skus[start : start + size]}
        body["nextPageToken"] = str(start + size) if start + size < len(self.skus) else ""
        return web.json_response(body)


def sku(description: str, *, regions: list[str], usd: float, group: str = "GPU") -> dict[str, Any]:
    """One Cloud Billing SKU; a "Spot Preemptible" description makes it a spot SKU."""
    units, nanos = int(usd), round((usd - int(usd)) * 1e9)
    usage = "Preemptible" if description.startswith("Spot Preemptible") else "OnDemand"
    return {
        "name": f"services/6F81-5844-456A/skus/{abs(hash(description)) % 10**6}",
        "description": description,
        "category": {
            "serviceDisplayName": "Compute Engine",
            "resourceFamily": "Compute",
            "resourceGroup": group,
            "usageType": usage,
        },
        "serviceRegions": regions,
        "pricingInfo": [
            {
                "pricingExpression": {
                    "usageUnit": "h",
                    "tieredRates": [
                        {
                            "startUsageAmount": 0,
                            "unitPrice": {
                                "currencyCode": "USD",
                                "units": str(units),
                                "nanos": nanos,
                            },
                        }
                    ],
                }
            }
        ],
    }


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 and an ephemeral port; yields the base URL."""
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@contextmanager
def serve_in_thread(app: web.Application) -> Iterator[str]:
    """Serve ``app`` from a thread with its own event loop (for synchronous callers such as
    click's CliRunner); yields the base URL and stops the server on exit."""
    loop = asyncio.new_event_loop()
    ready: queue.Queue[str] = queue.Queue()
    stop = asyncio.Event()

    async def run() -> None:
        async with serve(app) as url:
            ready.put(url)
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        yield ready.get(timeout=10)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()
