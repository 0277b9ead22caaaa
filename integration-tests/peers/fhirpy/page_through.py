"""A real FHIR client (fhirpy, from PyPI) pages through caregate.

Usage: python page_through.py BASE_URL
Prints one JSON object: how many resources it got, and every URL the client requested or saw
in Bundle links and fullUrls.
"""
import json
import sys

import requests
from fhirpy import SyncFHIRClient

base = sys.argv[1]
requested = []

_session_request = requests.Session.request


def _logged(self, method, url, *args, **kwargs):
    requested.append(url)
    return _session_request(self, method, url, *args, **kwargs)


requests.Session.request = _logged

client = SyncFHIRClient(base)
patients = client.resources("Patient").limit(1).fetch_all()
observations = (
    client.resources("Observation").search(patient=patients[0]["id"]).limit(40).fetch_all()
)
raw = client.resources("Observation").search(patient=patients[0]["id"]).limit(5).fetch_raw()
seen = [link["url"] for link in raw.get("link", [])]
seen += [entry["fullUrl"] for entry in raw.get("entry", [])]
print(
    json.dumps(
        {
            "patients": len(patients),
            "observations": len(observations),
            "patient_ids": [p["id"] for p in patients],
            "requested": requested,
            "seen": seen,
        }
    )
)
