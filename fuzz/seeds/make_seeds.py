#!/usr/bin/env python3
"""Writes the hand-made seed inputs into fuzz/corpus/<target>/seed-*: the request bodies the API
takes, in JSON, urlencoded and multipart form, and client WebSocket messages. Run from anywhere;
the fuzzer and `cargo fuzz cmin` add and prune the rest of the corpus."""
import base64
import json
import os
import urllib.parse

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")

BODIES = {
    "register-customer": {"email": "asha@example.com", "password": "correct horse 9", "name": "Asha Rao",
                          "phone_number": "+919876543210"},
    "register-pharmacy": {"email": "jan@example.com", "password": "s3cret-pass", "pharmacy_name": "Jan Aushadhi",
                          "phone_number": "080 2222 3333", "lat": 12.9716, "lng": 77.5946},
    "login": {"email": "asha@example.com", "password": "correct horse 9"},
    "verify": {"email": "asha@example.com", "otp": "042917"},
    "refresh": {"refresh": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"},
    "request": {"patient_lat": 12.9716, "patient_lng": 77.5946, "radius_km": 5, "quantity": 2,
                "medicine_name": "Paracetamol 500mg", "note": "Needed tonight"},
    "request-strings": {"patient_lat": " 12.97 ", "patient_lng": "77.59", "radius_km": "2.5", "quantity": "10.0"},
    "respond": {"request_id": 17, "response_type": "ACCEPTED", "text_message": "Ready in 10 minutes", "audio": None},
    "respond-rejected": {"request_id": "17", "response_type": "rejected"},
    "location": {"lat": -33.8688, "lng": 151.2093},
}

# 1x1 PNG and a JPEG start: enough for the server's magic-byte check.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
OGG = b"OggS\x00\x02" + bytes(20)


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def multipart(boundary, fields, files=()):
    out = b""
    for k, v in fields:
        out += b"--" + boundary + b"\r\n"
        out += b'Content-Disposition: form-data; name="' + k.encode() + b'"\r\n\r\n' + str(v).encode() + b"\r\n"
    for k, filename, ctype, data in files:
        out += b"--" + boundary + b"\r\n"
        out += b'Content-Disposition: form-data; name="' + k.encode() + b'"; filename="' + filename.encode() + b'"\r\n'
        out += b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


for name, body in BODIES.items():
    write("json", name, json.dumps(body).encode())
    write("form", name, urllib.parse.urlencode({k: ("" if v is None else v) for k, v in body.items()}).encode())
write("json", "numbers", b'{"quantity": 9007199254740993, "lat": 1e308, "lng": -0.0, "radius_km": 1.5e-3}')
write("json", "nested", b'{"note": {"a": [1, 2, {"b": null}]}, "quantity": [3], "name": true}')
write("json", "not-object", b"[1, 2, 3]")
write("json", "escapes", b'{"name": "Asha \\u0930\\u093e\\u0935 \\"A\\"", "email": "a\\/b@example.com"}')
write("form", "repeated", b"quantity=1&quantity=2&note=a+b%20c%26d&lat=NaN&lng=inf&email")

boundary = b"----sanjevani7MA4YWxk"
request_fields = [("patient_lat", 12.9716), ("patient_lng", 77.5946), ("radius_km", 5), ("quantity", 2),
                  ("medicine_name", "Amoxicillin 250mg")]
seeds = {
    "request-png": (0, 0, boundary, multipart(boundary, request_fields, [("image", "rx.png", "image/png", PNG)])),
    "request-jpeg-chunked": (0, 7, boundary, multipart(boundary, request_fields,
                                                        [("image", "rx.jpg", "image/jpeg", JPEG)])),
    "respond-audio-bytewise": (0, 1, boundary, multipart(boundary, [("request_id", 17), ("response_type", "ACCEPTED")],
                                                          [("audio", "a.ogg", "audio/ogg", OGG)])),
    "register-small-limit": (4, 13, b"xyz", multipart(b"xyz", [("email", "a@b.c"), ("password", "pw")])),
    "quoted-boundary": (0, 3, b'"a b"', multipart(b"a b", [("note", "quoted")])),
    "truncated-dropped": (8, 5, b"zzz", b'--zzz\r\nContent-Disposition: form-data; name="quantity"\r\n\r\n1'),
    "empty-file": (0, 0, b"B", multipart(b"B", [("quantity", 1)], [("image", "", "image/png", b"")])),
}
for name, (flags, split, param, body) in seeds.items():
    write("multipart", name, bytes([flags, split]) + param + b"\n" + body)

for name, msg in {
    "ping": b'{"type":"ping"}',
    "ping-spaced": b' { "type" : "ping" , "id": 1 } ',
    "unknown": b'{"type":"subscribe","channel":"requests"}',
    "number-type": b'{"type":42}',
    "no-type": b"{}",
    "not-json": b"ping",
    "long-type": b'{"type":"' + "\u0928".encode() * 80 + b'"}',
}.items():
    write("ws_message", name, msg)
