#!/usr/bin/env python3
"""Builds the benchmark fixtures from the Synthea demo bundles in conf/demo/data.

patient.json        one Patient resource (about 3 KB: the Synthea Patient without its extensions and text)
searchset-70k.json  a FHIR R4 searchset Bundle of about 70 KB: that Patient, then Observations,
                    Conditions, Encounters, Procedures, Immunizations and MedicationRequests of
                    the same patient, as a server answering a search with an include would
                    return them (the Patient last, as the include).

Run from anywhere: python3 benches/data/make_fixtures.py. The output is deterministic.
"""
import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE.parent.parent / "conf" / "demo" / "data" / "Liz_Conn_27c911c6-f045-4ffa-af5d-6eba57ac94b2.json"
BASE = "http://fhir.internal.example/fhir"
TARGET = 70 * 1024


def main():
    bundle = json.loads(SOURCE.read_text())
    resources = [e["resource"] for e in bundle["entry"]]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    pid = patient["id"]
    slim = {k: v for k, v in patient.items() if k not in ("extension", "text")}
    (HERE / "patient.json").write_text(json.dumps(slim, indent=2) + "\n")

    def fix(resource):
        text = json.dumps(resource)
        return json.loads(text.replace("urn:uuid:" + pid, "Patient/" + pid))

    entries = []
    size = 0
    for r in resources:
        if r["resourceType"] not in ("Observation", "Condition", "Encounter", "Procedure", "Immunization", "MedicationRequest"):
            continue
        r = fix(r)
        entry = {"fullUrl": f"{BASE}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
        # indent=1 at the depth the entry will have inside the Bundle
        size += len(json.dumps(entry, indent=1)) + 3 * json.dumps(entry, indent=1).count("\n") + 3
        if size > TARGET - 2000:
            break
        entries.append(entry)
    entries.append({"fullUrl": f"{BASE}/Patient/{pid}", "resource": slim, "search": {"mode": "include"}})
    searchset = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(entries) - 1,
        "link": [
            {"relation": "self", "url": f"{BASE}/Observation?patient={pid}&_include=Observation:patient"},
            {"relation": "next", "url": f"{BASE}/Observation?patient={pid}&_include=Observation:patient&_page=2"},
        ],
        "entry": entries,
    }
    (HERE / "searchset-70k.json").write_text(json.dumps(searchset, indent=1) + "\n")


if __name__ == "__main__":
    main()
