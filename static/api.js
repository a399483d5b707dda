// Renders the service's OpenAPI document for people: one section per operation with its
// parameters, request body and responses. No build step, no CDN.

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

/** The name of a schema reference, or a short description of an inline schema. */
function schemaName(schema) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.type === "array") return `array of ${schemaName(schema.items)}`;
  return Array.isArray(schema.type) ? schema.type.join(" or ") : schema.type || "value";
}

function operation(path, method, op) {
  const section = el("section", undefined, "operation");
  const heading = el("h2");
  heading.append(el("code", `${method.toUpperCase()} ${path}`));
  section.append(heading);
  if (op.description) for (const para of op.description.split("\n\n")) section.append(el("p", para.replace(/\n/g, " ")));
  if (op.parameters && op.parameters.length) {
    const list = el("ul");
    for (const p of op.parameters) {
      const item = el("li");
      item.append(el("code", p.name), ` (${p.in}${p.required ? ", required" : ""}): ${p.description || schemaName(p.schema)}`);
      list.append(item);
    }
    section.append(el("h3", "Parameters"), list);
  }
  if (op.requestBody) {
    const list = el("ul");
    for (const [type, media] of Object.entries(op.requestBody.content || {})) {
      const item = el("li");
      item.append(el("code", type), `: ${schemaName(media.schema)}`);
      list.append(item);
    }
    section.append(el("h3", "Body"), list);
  }
  const responses = el("ul");
  for (const [status, response] of Object.entries(op.responses || {})) {
    const item = el("li");
    item.append(el("strong", status), ` ${response.description || ""}`);
    responses.append(item);
  }
  section.append(el("h3", "Responses"), responses);
  return section;
}

async function render() {
  const key = sessionStorage.getItem("offload-api-key");
  const response = await fetch("/openapi.json", { headers: key ? { authorization: `Bearer ${key}` } : {} });
  if (!response.ok) {
    $("api-error").textContent = response.status === 401 ? "This service needs an API key: enter it on the main page first." : `HTTP ${response.status}`;
    return;
  }
  const doc = await response.json();
  document.title = `${doc.info.title} API ${doc.info.version}`;
  const main = $("operations");
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) main.append(operation(path, method, op));
  }
  const schemas = el("section");
  schemas.append(el("h2", "Schemas"));
  for (const [name, schema] of Object.entries(doc.components.schemas)) {
    const details = el("details");
    details.append(el("summary", name), el("pre", JSON.stringify(schema, null, 2)));
    schemas.append(details);
  }
  main.append(schemas);
}

render().catch((err) => ($("api-error").textContent = err.message));
