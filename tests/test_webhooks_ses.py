"""Amazon SES through SNS: the string SNS signs, both signature versions, the certificate
URL rule (a foreign URL is refused without any fetch), the certificate cache, the topic
check and subscription confirmation only after the signature verified."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import test_webhooks as shared
from helpers import rows, seed_subscribers, status_of
from webhook_payloads import SNS_HOST, TOPIC, SesHook, Sns, ses_bounce

from mailer.bounces.providers.common import Rejected
from mailer.bounces.providers.sns import sns_url, string_to_sign
from mailer.config import Settings

EMAIL = "conf000000@example.com"
# The fixtures of test_webhooks: all four providers configured, SNS answered locally.
settings_overrides = shared.settings_overrides
sns = shared.sns
client = shared.client


def test_string_to_sign_follows_the_message_type() -> None:
    notification = {
        "Type": "Notification",
        "MessageId": "0f0e-1",
        "TopicArn": TOPIC,
        "Message": 'line one\nline "two"',
        "Timestamp": "2026-01-02T03:04:05.678Z",
        "Token": "ignored for notifications",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }
    expected = (
        'Message\nline one\nline "two"\nMessageId\n0f0e-1\nTimestamp\n2026-01-02T03:04:05.678Z\n'
        f"TopicArn\n{TOPIC}\nType\nNotification\n"
    )
    assert string_to_sign(notification) == expected.encode()
    with_subject = notification | {"Subject": "Amazon SES Email Event Notification"}
    assert (
        string_to_sign(with_subject)
        == expected.replace(
            "Timestamp\n", "Subject\nAmazon SES Email Event Notification\nTimestamp\n"
        ).encode()
    )
    confirmation = {
        "Type": "SubscriptionConfirmation",
        "MessageId": "0f0e-2",
        "Token": "2336412f",
        "TopicArn": TOPIC,
        "Message": "You have chosen to subscribe.",
        "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
        "Timestamp": "2026-01-02T03:04:05.678Z",
        "Subject": "not signed for confirmations",
    }
    assert (
        string_to_sign(confirmation)
        == (
            "Message\nYou have chosen to subscribe.\nMessageId\n0f0e-2\n"
            "SubscribeURL\nhttps://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription\n"
            f"Timestamp\n2026-01-02T03:04:05.678Z\nToken\n2336412f\nTopicArn\n{TOPIC}\n"
            "Type\nSubscriptionConfirmation\n"
        ).encode()
    )
    with pytest.raises(Rejected) as refused:
        string_to_sign({k: v for k, v in confirmation.items() if k != "Token"})
    assert refused.value.status == 400 and "Token" in refused.value.detail


@pytest.mark.parametrize(
    "url",
    [
        f"https://{SNS_HOST}/SimpleNotificationService-0123.pem",
        "https://sns.eu-west-2.amazonaws.com/SimpleNotificationService-0123.pem",
        "https://sns.us-gov-west-1.amazonaws.com/x.pem",
        "https://sns.cn-north-1.amazonaws.com.cn/x.pem",
    ],
)
def test_sns_hosts_accepted(url: str) -> None:
    assert sns_url(url, "SigningCertURL") == url


BAD_URLS = [
    f"http://{SNS_HOST}/SimpleNotificationService-0123.pem",
    f"https://{SNS_HOST}.evil.example/SimpleNotificationService-0123.pem",
    f"https://{SNS_HOST}@evil.example/SimpleNotificationService-0123.pem",
    f"https://evil.example/{SNS_HOST}/SimpleNotificationService-0123.pem",
    f"https://{SNS_HOST}:8443/SimpleNotificationService-0123.pem",
    "https://sns.amazonaws.com/SimpleNotificationService-0123.pem",
    "https://s3.us-east-1.amazonaws.com/SimpleNotificationService-0123.pem",
    "https://sns.us-east-1.amazonaws.com.cn.evil.example/x.pem",
    f"https://{SNS_HOST}\\@evil.example/x.pem",
    f"https://{SNS_HOST}/x.pem\r\nHost: evil.example",
    f"https://{SNS_HOST}/cert.txt",
]


async def test_a_foreign_certificate_url_is_refused_without_any_fetch(
    client: httpx.AsyncClient, settings: Settings, sns: Sns
) -> None:
    await seed_subscribers(settings, confirmed=1)
    ses = SesHook(sns)
    for url in BAD_URLS:
        body = sns.sign(sns.notification(ses_bounce(EMAIL, None)), url=url)
        r = await client.post(ses.path, content=body)
        assert r.status_code == 403, (url, r.text)
        assert "SigningCertURL" in r.json()["detail"]
    assert sns.requests == []  # nothing was fetched, from anywhere
    # The right host, but no certificate there: fetched, refused.
    body = sns.sign(sns.notification(ses_bounce(EMAIL, None)), url=f"https://{SNS_HOST}/x.pem")
    r = await client.post(ses.path, content=body)
    assert r.status_code == 403 and "answered 404" in r.json()["detail"]
    assert [str(q.url) for q in sns.requests] == [f"https://{SNS_HOST}/x.pem"]
    assert await rows(settings) == [] and await status_of(settings, EMAIL) == "confirmed"


async def test_both_signature_versions_verify_and_the_certificate_is_fetched_once(
    client: httpx.AsyncClient, settings: Settings, sns: Sns
) -> None:
    await seed_subscribers(settings, confirmed=2)
    ses = SesHook(sns)
    for version, email in (("1", "conf000000@example.com"), ("2", "conf000001@example.com")):
        body = sns.sign(sns.notification(ses_bounce(email, None)), version=version)
        r = await client.post(ses.path, content=body)
        assert r.status_code == 200, r.text
        assert await status_of(settings, email) == "bounced"
    assert [q.url.path for q in sns.requests] == [sns.cert_path]  # cached after the first
    # A v1 signature presented as v2 (the wrong hash), and an unknown version: refused.
    message = json.loads(sns.sign(sns.notification(ses_bounce(EMAIL, None)), version="1"))
    for version in ("2", "3"):
        r = await client.post(ses.path, content=json.dumps(message | {"SignatureVersion": version}))
        assert r.status_code == 403, r.text
    assert len(await rows(settings)) == 2


async def test_only_configured_topics_are_accepted(
    client: httpx.AsyncClient, settings: Settings, sns: Sns
) -> None:
    await seed_subscribers(settings, confirmed=1)
    other = TOPIC.replace("mailer-ses-feedback", "someone-elses-topic")
    body = sns.sign(sns.notification(ses_bounce(EMAIL, None), TopicArn=other))
    r = await client.post("/webhooks/ses", content=body)
    assert r.status_code == 403 and "MAILER_SES_TOPIC_ARNS" in r.json()["detail"]
    assert sns.requests == [] and await rows(settings) == []


async def test_a_subscription_is_confirmed_only_once_its_signature_verifies(
    client: httpx.AsyncClient, settings: Settings, sns: Sns
) -> None:
    subscription = sns.subscription()
    forged = json.loads(sns.sign(subscription))
    forged["SubscribeURL"] += "&extra=1"
    r = await client.post("/webhooks/ses", content=json.dumps(forged))
    assert r.status_code == 403
    elsewhere = sns.subscription() | {"SubscribeURL": "https://evil.example/?Action=Confirm"}
    r = await client.post("/webhooks/ses", content=sns.sign(elsewhere))
    assert r.status_code == 403 and "SubscribeURL" in r.json()["detail"]
    assert [q.url.path for q in sns.requests] == [sns.cert_path]  # no confirmation visited

    headers = {"x-amz-sns-message-type": "SubscriptionConfirmation"}
    r = await client.post("/webhooks/ses", content=sns.sign(subscription), headers=headers)
    assert r.status_code == 200 and "confirmed" in r.json()["detail"]
    assert str(sns.requests[-1].url) == subscription["SubscribeURL"]
    assert sns.requests[-1].method == "GET"

    goodbye = sns.subscription() | {"Type": "UnsubscribeConfirmation"}
    r = await client.post("/webhooks/ses", content=sns.sign(goodbye))
    assert r.status_code == 200 and "not re-subscribed" in r.json()["detail"]
    assert len(sns.requests) == 2  # the certificate, the one confirmation
    assert await rows(settings) == []


async def test_a_signed_message_that_is_not_ses_json_is_stored_as_ignored(
    client: httpx.AsyncClient, settings: Settings, sns: Sns
) -> None:
    test_message = sns.notification({}) | {"Message": "Hello from the SNS console"}
    r = await client.post("/webhooks/ses", content=sns.sign(test_message))
    assert r.status_code == 200 and r.json()["stored"] == 1
    found: list[Any] = await rows(settings)
    assert [(r[0], r[1]) for r in found] == [("ignored", None)]
