// /docs: Swagger UI over this server's own /openapi.json. Every file comes from this server; the
// online spec validator (a badge Swagger UI fetches from its makers' site) is switched off.
"use strict";

(async () => {
  const root = document.getElementById("swagger-ui");
  let spec;
  try {
    const response = await fetch("/openapi.json");
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    spec = await response.json();
  } catch (err) {
    root.textContent = `Could not load /openapi.json: ${err.message}`;
    return;
  }
  // Each operation's curl example (`x-example`, `{base}`: the server's address) joins its
  // description, aimed at the server this page came from.
  for (const operations of Object.values(spec.paths)) {
    for (const op of Object.values(operations)) {
      const example = op["x-example"];
      if (example) {
        const curl = example.replaceAll("{base}", window.location.origin);
        op.description = `${op.description || ""}\n\nExample:\n\n\`\`\`sh\n${curl}\n\`\`\``;
      }
    }
  }
  window.ui = SwaggerUIBundle({
    spec,
    dom_id: "#swagger-ui",
    validatorUrl: null,
    deepLinking: true,
    docExpansion: "list",
    defaultModelsExpandDepth: 0,
    displayRequestDuration: true,
    // the key given in "Authorize" lives in this page only, never in localStorage
    persistAuthorization: false,
  });
})();
