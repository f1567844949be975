"""The masking helper: URLs and foreign error texts lose every secret, and nothing else."""

from __future__ import annotations

import pytest

from walship.redact import mask_url, redact


@pytest.mark.parametrize("url,shown", [
    ("file:///var/lib/walship", "file:///var/lib/walship"),
    ("azure://archive/cluster-1", "azure://archive/cluster-1"),
    ("https://acct.blob.core.windows.net/?sv=2021-08-06&sp=rl&sig=c2VjcmV0%3D",
     "https://acct.blob.core.windows.net/?<redacted>"),
    ("https://user:pa55@host:8443/path?x=1", "https://<redacted>@host:8443/path?<redacted>"),
    ("file://user:p@ss@host/x", "file://<redacted>@host/x"),
    ("http://127.0.0.1:10000/devstoreaccount1", "http://127.0.0.1:10000/devstoreaccount1"),
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown
    assert mask_url(shown) == shown  # masking twice changes nothing more


def test_redact_free_text():
    text = ("GET https://u:pw@acct.blob.core.windows.net/c/b?sv=1&sig=SIG failed;\n"
            "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=KEY==;"
            "SharedAccessSignature=sv=1&sig=SIG2")
    shown = redact(text)
    assert "\n" not in shown
    for secret in ("pw", "SIG", "KEY==", "SIG2"):
        assert secret not in shown.replace("<redacted>", "")
    assert "acct.blob.core.windows.net/c/b" in shown and "AccountName=a" in shown
    assert len(redact("x" * 1000)) == 300
