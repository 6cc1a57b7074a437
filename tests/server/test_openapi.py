"""``GET /openapi.json``: a valid OpenAPI 3 document of the served routes, from the schemas."""

from __future__ import annotations

from openapi_spec_validator import validate

from server.schemas.chat import ChatCompletionRequest

ROUTES = {
    "/v1/chat/completions": "post",
    "/v1/completions": "post",
    "/v1/models": "get",
    "/v1/models/{model_id}": "get",
    "/tokenize": "post",
    "/detokenize": "post",
    "/health": "get",
    "/ready": "get",
    "/metrics": "get",
}


async def test_openapi_json_is_valid_openapi_3_listing_the_routes(http):
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    document = response.json()
    validate(document)  # raises on anything that is not OpenAPI 3.x
    assert document["openapi"].startswith("3.")
    for path, method in ROUTES.items():
        assert method in document["paths"][path], path


async def test_request_schemas_are_the_validated_models(http):
    document = (await http.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert set(chat["properties"]) == set(ChatCompletionRequest.model_fields)
    assert chat["additionalProperties"] is False  # unknown fields are refused, as the server does
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    error = document["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]
    assert error["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert schemas["ErrorResponse"]["properties"]["error"]["required"] == ["message", "type", "param", "code"]
