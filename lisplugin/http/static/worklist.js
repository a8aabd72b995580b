"use strict";

// The worklist is rendered by the server; reloading it keeps waiting times and order current.
setTimeout(() => window.location.reload(), 30000);
